"""The Gemma family through tessellm's conformance kit (tessellm.testing.check_model_family).

Gemma 2 and 3 alike: GQA, ``query_pre_attn_scalar`` != head_dim, a sliding window of 8
tokens, attention and final-logit soft-caps (Gemma 3 configs carry the attention cap too;
transformers does not apply it there, nor does tessellm); Gemma 2 alternates sliding and
global layers, Gemma 3 gives each kind its own rope. The kit's HF reference runs eager
attention, where transformers applies soft-caps and windows itself.
"""

from __future__ import annotations

import pytest

from tessellm.testing import TEST_PROMPTS, check_model_family

GEMMA = dict(
    num_hidden_layers=4,
    head_dim=16,
    query_pre_attn_scalar=24,
    max_position_embeddings=256,
    sliding_window=8,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=8.0,
)
CONFIGS = {
    "Gemma2ForCausalLM": GEMMA,
    "Gemma3ForCausalLM": dict(
        **GEMMA,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 4.0},
        },
    ),
}


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_gemma_matches_hf(architecture):
    result = check_model_family(
        architecture, prompts=TEST_PROMPTS, max_tokens=24, config_overrides=CONFIGS[architecture]
    )
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
