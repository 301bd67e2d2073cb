"""The cuda platform through tessellm's conformance kit: its declarations and cheap
detection everywhere; the device facts where it is available (skipped, with the
platform's own reason, elsewhere)."""

from __future__ import annotations

import pytest

from tessellm.testing import check_platform, check_quantization_method


def test_cuda_platform_conforms_or_says_why_not():
    result = check_platform("cuda")
    result.raise_for_failures()
    if result.skipped_reason:
        pytest.skip(result.skipped_reason)
    assert result.passed


def test_unquantized_gemv_conforms_to_dense_linear():
    # On a GPU in bf16/fp16 the batch-1 products run the Triton GEMV; elsewhere torch's.
    result = check_quantization_method("unquantized_gemv")
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
