"""tessellm-bert through tessellm's conformance kit (embeddings equal sentence-transformers'),
and the pooling recipes a BERT checkpoint may name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tessellm import LLM
from tessellm.errors import ModelLoadError
from tessellm.testing import check_model_family
from tessellm.testing.embedding import (
    EMBEDDING_SENTENCES,
    assert_embedding_parity,
    tiny_embedding_model,
)


def test_conformance():
    result = check_model_family("BertModel")
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert result.passed and result.checked


@pytest.mark.parametrize(
    "pooling, normalize",
    [
        (("mean",), True),  # all-MiniLM-L6-v2's recipe
        (("cls",), False),
        (("max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"), True),  # concatenated
    ],
)
def test_pooling_recipes_match_sentence_transformers(tmp_path, pooling, normalize):
    path = tiny_embedding_model(
        "BertModel", tmp_path / "bert", pooling=pooling, normalize=normalize, seed=3
    )
    assert_embedding_parity(path)


def test_bert_with_odd_sizes_and_relu(tmp_path):
    # Heads of 8 over a hidden size of 48, six layers, ReLU: no size is a round default.
    path = tiny_embedding_model(
        "BertModel",
        tmp_path / "bert",
        hidden_size=48,
        num_attention_heads=6,
        num_hidden_layers=3,
        intermediate_size=80,
        hidden_act="relu",
    )
    assert_embedding_parity(path)


def test_without_sentence_transformers_files_cls_is_pooled_and_normalised(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_embedding_model("BertModel", tmp_path / "bert", sentence_transformers_files=False)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    out = llm.embed(EMBEDDING_SENTENCES[:4])
    for sentence, got in zip(EMBEDDING_SENTENCES[:4], out, strict=True):
        with torch.no_grad():
            states = hf(**tokenizer(sentence, return_tensors="pt")).last_hidden_state
        expected = F.normalize(states[0, 0], dim=-1)
        assert torch.allclose(torch.tensor(got.outputs.embedding), expected, atol=1e-5)


def test_unsupported_variants_are_refused(tmp_path):
    path = tiny_embedding_model("BertModel", tmp_path / "bert")
    config = json.loads((path / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="relative_key"):
        LLM(model=str(path), dtype="float32", device="cpu")


@pytest.mark.parametrize("pack_above", [1.0, 100.0])
def test_packed_and_padded_forwards(tmp_path, monkeypatch, pack_above):
    # 1.0: every batch with padding runs packed; 100: every batch runs in the padded grid.
    import tessellm_bert.model

    monkeypatch.setattr(tessellm_bert.model, "PACK_ABOVE", pack_above)
    path = tiny_embedding_model("BertModel", tmp_path / "bert", pooling=("mean", "cls"))
    assert_embedding_parity(path)
