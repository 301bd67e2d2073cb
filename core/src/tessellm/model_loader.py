"""From the user's ``model=`` string to a built model with its weights loaded."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionSpec, canonical_kv_cache_dtype
from tessellm.interfaces.model import AttentionRequirements, ModelContext
from tessellm.interfaces.weights import WeightFormat
from tessellm.plugins import PluginSet, get_plugins


@dataclass(slots=True)
class ResolvedModel:
    path: Path
    format_name: str
    source_name: str = ""  # the model source that resolved it


def resolve_model(
    plugins: PluginSet, model: str, cache_dir: Path, revision: str | None = None
) -> ResolvedModel:
    """Ask the model sources in order, then the weight formats, who handles ``model``.

    ``revision`` (a branch, tag or commit) goes to a source whose ``resolve`` takes it (the
    Hugging Face Hub's); a source without revisions refuses it rather than ignore it.
    """
    path: Path | None = None
    source_name = ""
    for source_name in plugins.names("model_sources"):
        source = plugins.load("model_sources", source_name)()
        if not source.matches(model):
            continue
        if revision is None:
            path = source.resolve(model, cache_dir)
        elif "revision" in inspect.signature(source.resolve).parameters:
            path = source.resolve(model, cache_dir, revision=revision)
        else:
            raise ModelLoadError(
                f"--revision applies to Hugging Face model IDs; {model!r} comes from the "
                f"{source_name!r} model source, which has no revisions"
            )
        break
    if path is None:
        aliases = []
        for name in plugins.names("model_sources"):
            aliases += plugins.load("model_sources", name)().aliases()
        raise ModelLoadError(
            f"model {model!r} is neither a local path, a Hugging Face model ID (org/name), "
            f"nor a known name (known names: {', '.join(sorted(aliases)) or 'none'}); "
            "pass a local HF directory (config.json + *.safetensors) or a .gguf file"
        )
    for name in plugins.names("weight_formats"):
        if plugins.load("weight_formats", name)().accepts(path):
            return ResolvedModel(path, name, source_name)
    if path.suffix == ".gguf":
        raise ModelLoadError(f"{path} is a GGUF file; install `tessellm-gguf` to read it")
    raise ModelLoadError(
        f"no installed weight format reads {path} (installed: "
        f"{', '.join(plugins.names('weight_formats')) or 'none'})"
    )


def weight_format(plugins: PluginSet, resolved: ResolvedModel) -> WeightFormat:
    return plugins.load("weight_formats", resolved.format_name)()


def architecture_of(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ModelLoadError(f"cannot tell the architecture of model type {config.model_type!r}")
    return name


def text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def head_size_of(config: Any) -> int:
    cfg = text_config(config)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def model_class(plugins: PluginSet, config: Any) -> type[nn.Module]:
    """The class the installed plugins register for the config's architecture."""
    arch = architecture_of(config)
    reg = plugins.get("models", arch)
    if reg is None:
        raise ModelLoadError(plugins.missing_message("models", arch))
    return reg.load()


def attention_spec(
    config: Any,
    device_type: str,
    dtype: torch.dtype,
    block_size: int,
    tp: int,
    plugins: PluginSet | None = None,
    kv_cache_dtype: str = "auto",
) -> AttentionSpec:
    """What the model asks of attention on this device: the registered model class's
    ``attention_requirements(config)`` (``plugins``: the process's plugins by default),
    with the heads divided among ``tp`` ranks, over a KV cache of ``kv_cache_dtype``."""
    model_cls = model_class(plugins if plugins is not None else get_plugins(), config)
    name = f"{model_cls.__module__}.{model_cls.__qualname__}"
    if not hasattr(model_cls, "attention_requirements"):  # a required member, checked once
        raise ModelLoadError(
            f"{name} does not say what attention it needs: define the classmethod "
            "attention_requirements(config), or inherit "
            "tessellm.interfaces.model.ConfigAttentionRequirements for the config's reading"
        )
    requirements = model_cls.attention_requirements(config)
    if not isinstance(requirements, AttentionRequirements):
        raise ModelLoadError(
            f"{name}.attention_requirements returned "
            f"{type(requirements).__name__}, not tessellm.interfaces.model.AttentionRequirements"
        )
    return AttentionSpec(
        device_type=device_type,
        dtype=dtype,
        head_size=requirements.head_size,
        num_heads=max(1, requirements.num_heads // tp),
        num_kv_heads=max(1, requirements.num_kv_heads // tp),
        block_size=block_size,
        sliding_window=requirements.sliding_window,
        logits_soft_cap=requirements.logits_soft_cap,
        kv_cache_dtype=canonical_kv_cache_dtype(kv_cache_dtype),
    )


def build_model(plugins: PluginSet, config: Any, ctx: ModelContext) -> nn.Module:
    model_cls = model_class(plugins, config)
    with torch.device(ctx.device):
        model = model_cls(config, ctx)
    return model.eval()


def load_weights(model: nn.Module, weights) -> None:
    """Load ``(name, tensor)`` pairs; a ``RandomWeights`` stream fills parameters instead."""
    from tessellm.formats.random_weights import RandomWeights

    if isinstance(weights, RandomWeights):
        loaded = weights.fill(model)
    else:
        loaded = model.load_weights(weights)
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks {len(missing)} weight(s): {shown}")
    for name, module in model.named_modules():
        quant = getattr(module, "quant", None)
        if quant is None:
            continue
        try:
            quant.process_weights_after_loading(module)
        except ValueError as exc:  # what the checkpoint holds does not fit the method
            raise ModelLoadError(f"{name}: {exc}") from exc


def model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def resolve_dtype(requested: str, platform_default: torch.dtype) -> torch.dtype:
    names = {
        "float32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "half": torch.float16,
    }
    return platform_default if requested == "auto" else names[requested]


def max_model_len_of(config: Any, requested: int | None) -> int:
    cfg = text_config(config)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    limit = int(limit) if limit else 2048
    if requested is not None and requested > limit:
        from tessellm.errors import ConfigError

        raise ConfigError(f"max_model_len {requested} exceeds the model's limit of {limit}")
    return requested or limit


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)


def eos_ids_of(config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


def generation_eos_ids(path: Path) -> list[int]:
    """EOS ids from ``generation_config.json`` (Llama 3 lists several there)."""
    file = path / "generation_config.json" if path.is_dir() else None
    if file is None or not file.exists():
        return []
    eos = json.loads(file.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def model_eos_ids(config: Any, tokenizer: Any, path: Path) -> frozenset[int]:
    """Every id that ends a sequence: the config's, the tokenizer's and the generation
    config's."""
    return eos_ids_of(config, tokenizer) | frozenset(generation_eos_ids(path))


def logits_width(config: Any, tokenizer: Any) -> int:
    """The model's vocabulary (its logits' width), else the tokenizer's size."""
    model_vocab = getattr(text_config(config), "vocab_size", None)
    return int(model_vocab or len(tokenizer))
