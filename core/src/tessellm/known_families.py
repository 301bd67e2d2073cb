"""Which published plugin provides a well-known architecture: data for "install X" hints.

The engine never chooses a model class from this table (plugins register architectures
themselves); it only lets an error name the package to install, or the entry point to
allow in ``TESSELLM_PLUGINS``, when no loaded plugin provides an architecture.
"""

from __future__ import annotations

from typing import NamedTuple


class FamilyPlugin(NamedTuple):
    distribution: str  # what `pip install` takes
    entry_point: str  # its name under the `tessellm` entry-point group


_LLAMA = FamilyPlugin("tessellm-llama", "llama")
_QWEN = FamilyPlugin("tessellm-qwen", "qwen")
_MISTRAL = FamilyPlugin("tessellm-mistral", "mistral")
_GEMMA = FamilyPlugin("tessellm-gemma", "gemma")
_PHI3 = FamilyPlugin("tessellm-phi3", "phi3")
_GPT_OPT = FamilyPlugin("tessellm-gpt-opt", "gpt_opt")

KNOWN_MODEL_PLUGINS: dict[str, FamilyPlugin] = {
    "LlamaForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _QWEN,
    "Qwen3ForCausalLM": _QWEN,
    "Qwen3MoeForCausalLM": _QWEN,
    "MistralForCausalLM": _MISTRAL,
    "MixtralForCausalLM": _MISTRAL,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "Phi3ForCausalLM": _PHI3,
    "GPT2LMHeadModel": _GPT_OPT,
    "OPTForCausalLM": _GPT_OPT,
}


def model_plugin_hint(
    architecture: str, allowed: set[str] | None, installed_entry_points: set[str]
) -> str:
    """What to do when no loaded plugin provides ``architecture``."""
    known = KNOWN_MODEL_PLUGINS.get(architecture)
    if known is None:
        hint = (
            "Install the model-family plugin that provides it (for example "
            "`pip install tessellm-llama` for Llama-style models)"
        )
        return hint + (", or add it to TESSELLM_PLUGINS." if allowed is not None else ".")
    if allowed is not None and known.entry_point in installed_entry_points:
        return (
            f"Its plugin {known.distribution!r} is installed but TESSELLM_PLUGINS does not "
            f"allow it: add {known.entry_point!r} to TESSELLM_PLUGINS."
        )
    return f"Install {known.distribution!r}: `pip install {known.distribution}`."
