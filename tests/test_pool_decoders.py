"""Decoder families as embedding models (last-token pooling over Qwen3 and Llama), and the
offline ``LLM.embed`` API around them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tessellm import LLM
from tessellm.errors import InvalidRequestError
from tessellm.pooling_params import PoolingParams
from tessellm.testing.embedding import (
    EMBEDDING_SENTENCES,
    assert_embedding_parity,
    sentence_transformers_embeddings,
    tiny_embedding_model,
)

ENGINE = dict(dtype="float32", device="cpu")


def test_bare_qwen3_last_token_with_a_sliding_window(tmp_path):
    # Saved as Qwen3Model (no "model." prefix, no LM head); layer 0 full attention, the
    # others a window of 4 tokens, shorter than most sentences; grouped KV heads.
    path = tiny_embedding_model(
        "Qwen3Model",
        tmp_path / "qwen3",
        pooling=("lasttoken",),
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    assert_embedding_parity(path)


def test_llama_causal_lm_checkpoint_mean_pooled(tmp_path):
    # A checkpoint with its LM head and "model." names, pooled as its files say.
    path = tiny_embedding_model(
        "LlamaForCausalLM", tmp_path / "llama", pooling=("mean",), normalize=False, seed=1
    )
    assert_embedding_parity(path)


def test_runner_pooling_turns_a_causal_lm_into_an_embedding_model(tiny_model_factory):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_model_factory("Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True)
    prompts = EMBEDDING_SENTENCES[:5]
    with pytest.raises(InvalidRequestError, match="generative model"):
        LLM(model=str(path), **ENGINE).embed(prompts)
    llm = LLM(model=str(path), runner="pooling", **ENGINE)
    out = llm.embed(prompts)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for prompt, got in zip(prompts, out, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            last = hf(input_ids=ids).last_hidden_state[0, -1]
        # No sentence-transformers files: vLLM's default, the last token, normalised.
        assert got.outputs.embedding == pytest.approx(F.normalize(last, dim=-1).tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def matryoshka_qwen3(tmp_path_factory):
    path = tiny_embedding_model(
        "Qwen3Model", tmp_path_factory.mktemp("mrl-qwen3"), pooling=("lasttoken",)
    )
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}))
    return path


@pytest.fixture(scope="module")
def matryoshka_llm(matryoshka_qwen3):
    return LLM(model=str(matryoshka_qwen3), **ENGINE)


def test_dimensions_cut_then_normalise(matryoshka_llm, matryoshka_qwen3):
    expected, _ = sentence_transformers_embeddings(matryoshka_qwen3, EMBEDDING_SENTENCES[:3])
    out = matryoshka_llm.embed(EMBEDDING_SENTENCES[:3], PoolingParams(dimensions=24))
    got = torch.tensor([o.outputs.embedding for o in out])
    assert got.shape == (3, 24)
    assert torch.allclose(got, F.normalize(expected[:, :24], dim=-1), atol=1e-5)
    raw = matryoshka_llm.embed(EMBEDDING_SENTENCES[0], PoolingParams(normalize=False))[0]
    assert abs(torch.tensor(raw.outputs.embedding).norm().item() - 1) > 1e-3
    with pytest.raises(InvalidRequestError, match=r"dimensions must be in \[1, 64\]"):
        matryoshka_llm.embed("A", PoolingParams(dimensions=65))


def test_prompt_forms_and_refusals(matryoshka_llm):
    tokenizer = matryoshka_llm.get_tokenizer()
    ids = tokenizer("The quick brown fox")["input_ids"]
    forms = [
        matryoshka_llm.embed("The quick brown fox"),
        matryoshka_llm.embed(ids),
        matryoshka_llm.embed([{"prompt_token_ids": ids}]),
        matryoshka_llm.embed({"prompt": "The quick brown fox"}),
    ]
    for out in forms:
        assert len(out) == 1 and out[0].prompt_token_ids == ids and out[0].finished
        assert out[0].outputs.embedding == forms[0][0].outputs.embedding
    with pytest.raises(InvalidRequestError, match="use embed"):
        matryoshka_llm.generate("A")
    with pytest.raises(InvalidRequestError, match="use embed"):
        matryoshka_llm.chat([{"role": "user", "content": "A"}])
    with pytest.raises(InvalidRequestError, match="one PoolingParams, or one per prompt"):
        matryoshka_llm.embed(["A", "B"], [PoolingParams()])


def test_a_model_without_matryoshka_refuses_dimensions(tmp_path):
    path = tiny_embedding_model("Qwen3Model", tmp_path / "q", pooling=("lasttoken",))
    llm = LLM(model=str(path), **ENGINE)
    with pytest.raises(InvalidRequestError, match="does not support matryoshka"):
        llm.embed("A", PoolingParams(dimensions=8))
