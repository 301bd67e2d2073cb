"""The Qwen family through tessellm's conformance kit (tessellm.testing.check_model_family):
Qwen2, Qwen3 and Qwen3-MoE with grouped-query attention and a sliding window of 8 tokens,
shorter than most prompts (and every prompt behind the kit's shared prefix)."""

from __future__ import annotations

import pytest

from tessellm.testing import TEST_PROMPTS, check_model_family

WINDOW = dict(use_sliding_window=True, sliding_window=8)
CONFIGS = {
    # Layer 0 full attention, the others windowed (transformers: i >= max_window_layers).
    "Qwen2ForCausalLM": dict(**WINDOW, max_window_layers=1),
    # head_dim 32 != hidden/heads; tied head as the small Qwen3 models have it.
    "Qwen3ForCausalLM": dict(**WINDOW, max_window_layers=1, head_dim=32, tie_word_embeddings=True),
    # Layer 0 keeps a dense MLP; top-k weights are not renormalised.
    "Qwen3MoeForCausalLM": dict(
        **WINDOW, num_experts=4, moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0]
    ),
}


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_qwen_matches_hf(architecture):
    result = check_model_family(
        architecture, prompts=TEST_PROMPTS, max_tokens=24, config_overrides=CONFIGS[architecture]
    )
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
