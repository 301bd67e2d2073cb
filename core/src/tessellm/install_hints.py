"""Which package provides an architecture or a quantization method that no loaded plugin
serves: "install X" hints.

The engine never chooses a model class from hints (plugins register architectures
themselves); a hint only lets an error name the package to install, or the entry point to
allow in ``TESSELLM_PLUGINS``. Hints are registrations like any other
(``register_install_hints``): core's built-in plugin registers the first-party families
below (families by architecture; quantization methods by method name and by the checkpoint
``quant_method`` they read), and any plugin may add its own.
"""

from __future__ import annotations

from tessellm.hookspecs import InstallHint

_LLAMA = InstallHint("tessellm-llama", "llama")
_QWEN = InstallHint("tessellm-qwen", "qwen")
_MISTRAL = InstallHint("tessellm-mistral", "mistral")
_GEMMA = InstallHint("tessellm-gemma", "gemma")
_PHI3 = InstallHint("tessellm-phi3", "phi3")
_GPT_OPT = InstallHint("tessellm-gpt-opt", "gpt_opt")

_INT4 = InstallHint("tessellm-quant-int4", "quant_int4")
_INT8 = InstallHint("tessellm-quant-int8", "quant_int8")
_FP8 = InstallHint("tessellm-quant-fp8", "quant_fp8")
_COMPRESSED = InstallHint("tessellm-quant-compressed-tensors", "quant_compressed_tensors")

# Quantization methods and the checkpoint formats (``quant_method``) they read.
FIRST_PARTY_QUANTIZATION: dict[str, InstallHint] = {
    "gptq": _INT4,
    "awq": _INT4,
    "woq_int4": _INT4,
    "woq_grid": _INT4,
    "int8": _INT8,
    "int8_weight_only": _INT8,
    "fp8": _FP8,
    "compressed-tensors": _COMPRESSED,
    "gguf": InstallHint("tessellm-gguf", "gguf"),
}

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
    "BertModel": InstallHint("tessellm-bert", "bert"),
    "Mamba2ForCausalLM": InstallHint("tessellm-mamba", "mamba"),
    "BambaForCausalLM": InstallHint("tessellm-mamba", "mamba"),
    "LlavaForConditionalGeneration": InstallHint("tessellm-llava", "llava"),
}


def plugin_hint(
    hint: InstallHint | None,
    allowed: set[str] | None,
    installed_entry_points: set[str],
    kind: str = "models",
) -> str:
    """What to do when no loaded plugin provides a component (``kind``: ``"models"`` for an
    architecture, ``"quantization_methods"`` for a method or checkpoint format) whose hint
    is ``hint``."""
    if hint is None:
        text = (
            "Install the model-family plugin that provides it (for example "
            "`pip install tessellm-llama` for Llama-style models)"
            if kind == "models"
            else "Install the quantization plugin that provides it"
        )
        return text + (", or add it to TESSELLM_PLUGINS." if allowed is not None else ".")
    if allowed is not None and hint.entry_point in installed_entry_points:
        return (
            f"Its plugin {hint.distribution!r} is installed but TESSELLM_PLUGINS does not "
            f"allow it: add {hint.entry_point!r} to TESSELLM_PLUGINS."
        )
    return f"Install {hint.distribution!r}: `pip install {hint.distribution}`."
