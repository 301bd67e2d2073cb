"""Both families through the conformance kit as `tessellm doctor` runs it: transformers'
default configs made tiny by the kit, every parity mode (the prefix-cache mode checks
tokens only: models with recurrent layers keep no prefix cache)."""

from __future__ import annotations

import pytest

from tessellm.testing import check_model_family


@pytest.mark.parametrize("architecture", ["Mamba2ForCausalLM", "BambaForCausalLM"])
def test_family_passes_the_kit(architecture):
    result = check_model_family(architecture)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
