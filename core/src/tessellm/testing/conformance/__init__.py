"""Conformance checks: each returns a ``CheckResult`` and never raises for a failing
plugin."""

from tessellm.testing.conformance.attention import check_attention_backend
from tessellm.testing.conformance.family import check_model_family
from tessellm.testing.conformance.platform import check_platform
from tessellm.testing.conformance.quantization import check_quantization_method
from tessellm.testing.conformance.result import CheckResult
from tessellm.testing.conformance.speculative import check_speculative_proposer
from tessellm.testing.conformance.structured_output import check_structured_output_backend

__all__ = [
    "CheckResult",
    "check_attention_backend",
    "check_model_family",
    "check_platform",
    "check_quantization_method",
    "check_speculative_proposer",
    "check_structured_output_backend",
]
