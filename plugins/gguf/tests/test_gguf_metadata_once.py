"""A GGUF file's metadata is parsed once for its config and tokenizer conversions
(``metadata_once``), with the same results as two parses."""

from __future__ import annotations

import pytest
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from gguf_test_files import QT, write_tiny_llama

from tessellm_gguf import metadata_once
from tessellm_gguf.format import GGUFFormat


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_llama(tmp_path / "tiny-llama.gguf", {"attn_q": QT.Q8_0})


def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = gguf_utils.load_gguf_checkpoint

    def counted(path, return_tensors=False, *args, **kwargs):
        calls.append(str(path))
        return original(path, return_tensors, *args, **kwargs)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", counted)
    return calls


def test_config_and_tokenizer_share_one_parse(tiny_gguf, monkeypatch):
    calls = _counting(monkeypatch)
    fmt = GGUFFormat()
    config = fmt._convert_config(tiny_gguf)
    tokenizer = fmt._convert_tokenizer(tiny_gguf)
    assert len(calls) == 1  # two without the shared parse (config, tokenizer's config)
    assert gguf_utils.load_gguf_checkpoint.__name__ == "counted"  # the patch is undone
    assert metadata_once._kept == {}  # dropped after the tokenizer

    with monkeypatch.context() as patch:  # the same conversions, each parsing alone
        patch.setattr(metadata_once, "read_once", _no_sharing)
        patch.setattr("tessellm_gguf.format.read_once", _no_sharing)
        alone_config = fmt._convert_config(tiny_gguf)
        alone_tokenizer = fmt._convert_tokenizer(tiny_gguf)
    assert len(calls) == 3
    assert config.to_dict() == alone_config.to_dict()
    text = "hello tiny world"
    assert tokenizer.encode(text) == alone_tokenizer.encode(text)
    assert tokenizer.get_vocab() == alone_tokenizer.get_vocab()


def test_callers_get_their_own_copy(tiny_gguf):
    with metadata_once.read_once():
        first = gguf_utils.load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)
        first["config"]["edited"] = True
        second = gguf_utils.load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)
    metadata_once.forget()
    assert "edited" not in second["config"]


def _no_sharing():
    from contextlib import nullcontext

    return nullcontext()
