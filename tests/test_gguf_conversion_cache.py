"""The GGUF conversion cache: converted once, read back equal, rebuilt when the file
changes, off with TESSELLM_GGUF_CACHE=0."""

from __future__ import annotations

import os

import pytest
import torch

from tessellm_gguf import conversion_cache as cc


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cc.DISABLE_ENV, raising=False)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not really a gguf")
    return path


def converter(calls: list[str]):
    def convert():
        calls.append("weights")
        yield "layer.weight", torch.arange(12, dtype=torch.float32).view(3, 4) / 7
        yield "norm.weight", torch.full((4,), 1 / 3)

    return convert


def test_weights_converted_once_then_read_back(gguf_file):
    calls: list[str] = []
    first = dict(cc.cached_weights(gguf_file, torch.bfloat16, converter(calls)))
    second = dict(cc.cached_weights(gguf_file, torch.bfloat16, converter(calls)))
    assert calls == ["weights"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name])
    # Matrices in the run dtype, vectors as converted (a model may keep norms wider).
    assert second["layer.weight"].dtype == torch.bfloat16
    assert second["norm.weight"].dtype == torch.float32
    # Another dtype is another file.
    dict(cc.cached_weights(gguf_file, torch.float32, converter(calls)))
    assert calls == ["weights", "weights"]


def test_changed_file_or_disabled_cache_converts_again(gguf_file, monkeypatch):
    calls: list[str] = []
    dict(cc.cached_weights(gguf_file, torch.float32, converter(calls)))
    old = cc.cache_dir_for(gguf_file)
    gguf_file.write_bytes(b"a different file")
    os.utime(gguf_file, ns=(1, 1))
    assert cc.cache_dir_for(gguf_file) != old
    dict(cc.cached_weights(gguf_file, torch.float32, converter(calls)))
    monkeypatch.setenv(cc.DISABLE_ENV, "0")
    assert cc.cache_dir_for(gguf_file) is None
    dict(cc.cached_weights(gguf_file, torch.float32, converter(calls)))
    assert calls == ["weights"] * 3


def test_config_and_tokenizer_round_trip(gguf_file, tiny_llama):
    from transformers import AutoConfig, AutoTokenizer

    made: list[str] = []

    def config():
        made.append("config")
        return AutoConfig.from_pretrained(tiny_llama)

    def tokenizer():
        made.append("tokenizer")
        return AutoTokenizer.from_pretrained(tiny_llama)

    first = cc.cached_config(gguf_file, config), cc.cached_tokenizer(gguf_file, tokenizer)
    again = cc.cached_config(gguf_file, config), cc.cached_tokenizer(gguf_file, tokenizer)
    assert made == ["config", "tokenizer"]
    loaded, converted = again[0].to_dict(), first[0].to_dict()
    loaded.pop("_name_or_path"), converted.pop("_name_or_path")  # where it was read from
    assert loaded == converted
    text = "The quick brown fox"
    assert again[1].encode(text) == first[1].encode(text)
    assert again[1].chat_template == first[1].chat_template
