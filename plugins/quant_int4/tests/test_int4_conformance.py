"""Every method of the package through tessellm's conformance kit: layers (plain, row
split, fused q/k/v and gate/up) loaded from what ``checkpoint_tensors`` stores, against
the dense product, in each dtype the CPU runs."""

from __future__ import annotations

import pytest

from tessellm.testing import check_quantization_method

# 4-bit round-to-nearest of the kit's weights where the format's groups do not line up
# with the weights' own (act-order shuffles inputs across groups, -1 spans several of
# them): ~5-7% per row. A layout, zero-point or scale mistake is 30% or more.
LOSSY_ROW_TOLERANCE = 0.12


@pytest.mark.parametrize("method", ["woq_int4", "woq_grid", "gptq", "awq"])
def test_method_conforms_with_its_defaults(method):
    result = check_quantization_method(method)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert any("bfloat16" in case for case in result.checked)
    assert any("qkv" in case for case in result.checked) or method.startswith("woq")


@pytest.mark.parametrize(
    ("method", "config", "lossless"),
    [
        ("gptq", {"group_size": 32, "sym": False}, True),
        ("gptq", {"group_size": 64, "sym": True, "checkpoint_format": "gptq_v2"}, True),
        ("gptq", {"group_size": 128, "desc_act": True, "sym": False}, False),
        ("gptq", {"group_size": -1, "sym": True}, False),
        ("awq", {"group_size": 64}, True),
    ],
)
def test_checkpoint_variants_conform(method, config, lossless):
    rel_tol = None if lossless else LOSSY_ROW_TOLERANCE
    result = check_quantization_method(method, quant_config=config, rel_tol=rel_tol)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
