"""The Phi-3 family through tessellm's conformance kit (tessellm.testing.check_model_family):
partial rotary embeddings with LongRoPE, a sliding window of 8 tokens and GQA.

LongRoPE scales frequencies by its short factors up to the original context and by its
long factors beyond it. transformers re-prefills a sequence that crosses the limit while
generating, which tessellm does not do, so each case keeps to one side of it: an original
context of 128 (nothing crosses: short factors) and one of 4 with prompts longer than 4
tokens (long factors throughout).
"""

from __future__ import annotations

import pytest

from tessellm.testing import TEST_PROMPTS, check_model_family

ROTARY_HALF = 4  # head 16, partial_rotary_factor 0.5 -> 8 rotary dims -> 4 frequencies


def longrope(original_max: int) -> dict:
    return dict(
        max_position_embeddings=256,
        original_max_position_embeddings=original_max,
        sliding_window=8,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": original_max,
            "short_factor": [1.0 + 0.1 * i for i in range(ROTARY_HALF)],
            "long_factor": [2.0 + 3.0 * i for i in range(ROTARY_HALF)],
        },
    )


def test_phi3_short_factors_match_hf():
    result = check_model_family(
        "Phi3ForCausalLM", prompts=TEST_PROMPTS, max_tokens=24, config_overrides=longrope(128)
    )
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()


@pytest.mark.parametrize("original_max", [4])
def test_phi3_long_factors_match_hf(original_max):
    # The kit's word-level tokenizer: one token per whitespace-separated word.
    longer = [p for p in TEST_PROMPTS if len(p.split()) > original_max]
    assert len(longer) >= 4
    result = check_model_family(
        "Phi3ForCausalLM",
        prompts=longer,
        max_tokens=24,
        config_overrides=longrope(original_max),
    )
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
