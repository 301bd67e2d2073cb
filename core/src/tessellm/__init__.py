"""tessellm: a fast LLM inference and serving engine built from plugins.

``from tessellm import LLM, SamplingParams`` for offline generation; ``tessellm serve`` for
the OpenAI-compatible server; ``tessellm.hookimpl`` to write a plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tessellm.hookspecs import PLUGIN_API_VERSION, hookimpl
from tessellm.outputs import CompletionOutput, RequestOutput
from tessellm.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from tessellm.config import EngineArgs
    from tessellm.engine.llm_engine import LLMEngine
    from tessellm.entrypoints.llm import LLM

__all__ = [
    "LLM",
    "PLUGIN_API_VERSION",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "hookimpl",
]

_LAZY = {
    "LLM": "tessellm.entrypoints.llm",
    "LLMEngine": "tessellm.engine.llm_engine",
    "EngineArgs": "tessellm.config",
}


def __getattr__(name: str) -> Any:
    # Keep `import tessellm` (and so every plugin import) cheap: the engine loads on use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
