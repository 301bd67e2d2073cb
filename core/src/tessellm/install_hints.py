"""Which package provides an architecture that no loaded plugin serves: "install X" hints.

The engine never chooses a model class from hints (plugins register architectures
themselves); a hint only lets an error name the package to install, or the entry point to
allow in ``TESSELLM_PLUGINS``. Hints are registrations like any other
(``register_install_hints``): core's built-in plugin registers the first-party families
below, and any plugin may add its own.
"""

from __future__ import annotations

from tessellm.hookspecs import InstallHint

_LLAMA = InstallHint("tessellm-llama", "llama")
_QWEN = InstallHint("tessellm-qwen", "qwen")
_MISTRAL = InstallHint("tessellm-mistral", "mistral")
_GEMMA = InstallHint("tessellm-gemma", "gemma")
_PHI3 = InstallHint("tessellm-phi3", "phi3")
_GPT_OPT = InstallHint("tessellm-gpt-opt", "gpt_opt")

FIRST_PARTY_FAMILIES: dict[str, InstallHint] = {
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
    hint: InstallHint | None, allowed: set[str] | None, installed_entry_points: set[str]
) -> str:
    """What to do when no loaded plugin provides an architecture whose hint is ``hint``."""
    if hint is None:
        text = (
            "Install the model-family plugin that provides it (for example "
            "`pip install tessellm-llama` for Llama-style models)"
        )
        return text + (", or add it to TESSELLM_PLUGINS." if allowed is not None else ".")
    if allowed is not None and hint.entry_point in installed_entry_points:
        return (
            f"Its plugin {hint.distribution!r} is installed but TESSELLM_PLUGINS does not "
            f"allow it: add {hint.entry_point!r} to TESSELLM_PLUGINS."
        )
    return f"Install {hint.distribution!r}: `pip install {hint.distribution}`."
