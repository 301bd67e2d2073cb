"""The tpu platform through tessellm's conformance kit: its declarations and cheap
detection everywhere; the device facts where it is available (skipped, with the
platform's own reason, elsewhere)."""

from __future__ import annotations

import pytest

from tessellm.testing import check_platform


def test_tpu_platform_conforms_or_says_why_not():
    result = check_platform("tpu")
    result.raise_for_failures()
    if result.skipped_reason:
        pytest.skip(result.skipped_reason)
    assert result.passed
