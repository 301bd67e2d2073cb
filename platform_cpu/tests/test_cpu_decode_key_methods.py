"""The compiled-decode cache key tells quantization methods apart, even where two methods
of one package hold the same parameters (a library of one must never serve the other)."""

from __future__ import annotations

import pytest

from tessellm import LLM
from tessellm_cpu.decode_key import held_objects_settings


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tessellm.testing import tiny_model

    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("key") / "m")


def settings(path, method: str) -> list[str]:
    llm = LLM(str(path), dtype="float32", enforce_eager=True, quantization=method)
    return held_objects_settings(llm.engine.executor.runner.model)


def test_methods_with_the_same_parameters_get_different_keys(tiny_llama):
    w8a8, weight_only = settings(tiny_llama, "int8"), settings(tiny_llama, "int8_weight_only")
    assert w8a8 != weight_only
    assert settings(tiny_llama, "woq_int4") != settings(tiny_llama, "woq_grid")


def test_the_same_method_built_twice_gets_the_same_key(tiny_llama):
    first = settings(tiny_llama, "int8")
    assert first == settings(tiny_llama, "int8")
    assert any("Int8W8A8" in entry for entry in first)
    assert not any(" at 0x" in entry for entry in first)  # no addresses: stable across runs
