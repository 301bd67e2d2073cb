"""The torch reference backend through tessellm's conformance kit: every capability it
claims against paged attention's definition, and greedy parity with HF when serving."""

from __future__ import annotations

from tessellm.testing import assert_greedy_parity, check_attention_backend


def test_torch_backend_conforms():
    result = check_attention_backend("torch")
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert any("window" in case and "soft-cap" in case for case in result.checked)


def test_torch_backend_serves_hf_tokens(tiny_model_factory):
    model = tiny_model_factory("Gemma2ForCausalLM", sliding_window=8, attn_logit_softcapping=5.0)
    assert_greedy_parity(model, max_tokens=12, device="cpu", attention_backend="torch")
