"""The sdpa backend with tessellm's conformance kit (tessellm.testing, a pytest plugin that
comes with tessellm): every capability it claims against paged attention's definition, and
greedy tokens equal HF transformers' when an engine serves with it."""

from __future__ import annotations

import pytest

from tessellm.plugins import get_plugins
from tessellm.testing import assert_greedy_parity, check_attention_backend

BACKEND = "sdpa"


def test_registered_by_this_package():
    registration = get_plugins().get("attention_backends", BACKEND)
    assert registration is not None, "pip install -e . (the entry point must be installed)"
    assert registration.plugin == "example_sdpa"


def test_conforms():
    result = check_attention_backend(BACKEND)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert any("window" in case for case in result.checked)


@pytest.mark.parametrize(
    "architecture, overrides",
    [("LlamaForCausalLM", {}), ("MistralForCausalLM", {"sliding_window": 8})],
    ids=["llama", "mistral-window-8"],
)
def test_serves_hf_greedy_tokens(tiny_model_factory, architecture, overrides):
    model = tiny_model_factory(architecture, **overrides)
    assert_greedy_parity(model, max_tokens=16, device="cpu", attention_backend=BACKEND)
