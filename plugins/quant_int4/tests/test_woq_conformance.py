"""The CPU weight-only int4 methods through tessellm's conformance kit."""

from __future__ import annotations

import pytest

from tessellm.testing import check_quantization_method


@pytest.mark.parametrize("method", ["woq_int4", "woq_grid"])
def test_cpu_weight_only_int4_conforms_to_dense_linear(method):
    result = check_quantization_method(method)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert any("bfloat16" in case for case in result.checked)
