"""GPT-2 and OPT through tessellm's conformance kit (tessellm.testing.check_model_family):
GPT-2 with per-layer score scaling; OPT pre-LN, and post-LN with narrower projected
embeddings (OPT-350m's shape)."""

from __future__ import annotations

import pytest

from tessellm.testing import TEST_PROMPTS, check_model_family

CASES = {
    "GPT2LMHeadModel": ("GPT2LMHeadModel", dict(scale_attn_by_inverse_layer_idx=True)),
    "OPTForCausalLM": ("OPTForCausalLM", {}),
    "OPTForCausalLM-post-ln": (
        "OPTForCausalLM",
        dict(do_layer_norm_before=False, word_embed_proj_dim=32),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpt_opt_matches_hf(case):
    architecture, overrides = CASES[case]
    result = check_model_family(
        architecture, prompts=TEST_PROMPTS, max_tokens=24, config_overrides=overrides
    )
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
