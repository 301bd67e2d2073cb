"""The CPU platform through tessellm's conformance kit (its default quantization method,
woq_grid, is checked with the tessellm-quant-int4 package)."""

from __future__ import annotations

from tessellm.testing import check_platform


def test_cpu_platform_conforms():
    result = check_platform("cpu")
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
