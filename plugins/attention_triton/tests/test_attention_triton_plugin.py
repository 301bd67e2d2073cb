"""The Triton attention backend through tessellm's conformance kit, on a GPU (the kit
skips it, with the reason, on a machine without one)."""

from __future__ import annotations

import pytest
import torch

from tessellm.testing import assert_greedy_parity, check_attention_backend


def test_triton_backend_conforms_or_says_why_not():
    result = check_attention_backend("triton")
    result.raise_for_failures()
    if not torch.cuda.is_available():
        assert "claims device types ['cuda', 'hip']" in (result.skipped_reason or "")
        pytest.skip(result.skipped_reason)
    assert result.passed, result.summary()


# Head size 32: the smallest the backend claims. Both run with CUDA graphs (Gemma 2's
# scaled embedding once copied its scale from the host inside the captured step, which
# capture refuses: this case is its regression test).
CASES = {
    "mistral-window": ("MistralForCausalLM", dict(sliding_window=8), {}),
    "gemma2-window-soft-cap": (
        "Gemma2ForCausalLM",
        dict(sliding_window=8, attn_logit_softcapping=5.0),
        {},
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_backend_serves_hf_tokens(tiny_model_factory, case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    architecture, overrides, engine_args = CASES[case]
    model = tiny_model_factory(architecture, hidden_size=128, head_dim=32, **overrides)
    assert_greedy_parity(
        model, max_tokens=12, device="cuda", attention_backend="triton", **engine_args
    )
