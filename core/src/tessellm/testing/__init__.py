"""Test kit for tessellm and its plugins: tiny models, HF references, parity and
conformance checks. Loaded by pytest as the ``tessellm`` plugin (fixtures
``tessellm_cache_dir`` and ``tiny_model_factory``); see docs/testing.md.

Importing this package is cheap (pytest imports it in every run): the helpers load torch
and transformers when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tessellm.testing.conformance import (
        CheckResult,
        check_attention_backend,
        check_model_family,
        check_platform,
        check_quantization_method,
        check_speculative_proposer,
        check_structured_output_backend,
    )
    from tessellm.testing.models import (
        TEST_PROMPTS,
        TINY_DECODER,
        UnknownArchitectureError,
        make_tokenizer,
        save_tiny_model,
        tiny_config,
        tiny_model,
    )
    from tessellm.testing.parity import assert_greedy_parity, greedy_parity_failures
    from tessellm.testing.reference import hf_continuation, hf_greedy

_LAZY = {
    "TEST_PROMPTS": "tessellm.testing.models",
    "TINY_DECODER": "tessellm.testing.models",
    "UnknownArchitectureError": "tessellm.testing.models",
    "make_tokenizer": "tessellm.testing.models",
    "save_tiny_model": "tessellm.testing.models",
    "tiny_config": "tessellm.testing.models",
    "tiny_model": "tessellm.testing.models",
    "hf_greedy": "tessellm.testing.reference",
    "hf_continuation": "tessellm.testing.reference",
    "assert_greedy_parity": "tessellm.testing.parity",
    "greedy_parity_failures": "tessellm.testing.parity",
    "CheckResult": "tessellm.testing.conformance",
    "check_attention_backend": "tessellm.testing.conformance",
    "check_quantization_method": "tessellm.testing.conformance",
    "check_platform": "tessellm.testing.conformance",
    "check_model_family": "tessellm.testing.conformance",
    "check_structured_output_backend": "tessellm.testing.conformance",
    "check_speculative_proposer": "tessellm.testing.conformance",
}

__all__ = [
    "TEST_PROMPTS",
    "TINY_DECODER",
    "CheckResult",
    "UnknownArchitectureError",
    "assert_greedy_parity",
    "check_attention_backend",
    "check_model_family",
    "check_platform",
    "check_quantization_method",
    "check_speculative_proposer",
    "check_structured_output_backend",
    "greedy_parity_failures",
    "hf_continuation",
    "hf_greedy",
    "make_tokenizer",
    "save_tiny_model",
    "tiny_config",
    "tiny_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tessellm.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
