"""The Llama family through tessellm's conformance kit: greedy tokens equal HF
transformers' fp32 ones batched, one at a time, with prefix-cache hits and under
preemption (tessellm.testing.check_model_family)."""

from __future__ import annotations

from tessellm.testing import TEST_PROMPTS, check_model_family


def test_llama_matches_hf():
    result = check_model_family("LlamaForCausalLM", prompts=TEST_PROMPTS, max_tokens=24)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
