"""The Mistral family through tessellm's conformance kit (tessellm.testing.check_model_family):
Mistral and Mixtral (4 experts, 2 per token) with a sliding window of 8 tokens."""

from __future__ import annotations

import pytest

from tessellm.testing import TEST_PROMPTS, check_model_family

CONFIGS = {
    "MistralForCausalLM": dict(sliding_window=8),
    "MixtralForCausalLM": dict(sliding_window=8, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_mistral_matches_hf(architecture):
    result = check_model_family(
        architecture, prompts=TEST_PROMPTS, max_tokens=24, config_overrides=CONFIGS[architecture]
    )
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
