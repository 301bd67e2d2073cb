"""Choosing a platform, an attention backend and a quantization method, recording why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tessellm.errors import ConfigError, ModelLoadError
from tessellm.interfaces.attention import AttentionBackend, AttentionSpec
from tessellm.interfaces.platform import Platform
from tessellm.interfaces.quantization import QuantCapabilities, QuantizationMethod
from tessellm.plugins import PluginError, PluginSet


@dataclass
class Choice:
    chosen: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # why the chosen one could serve ("" when it does not say)

    def explain(self, kind: str) -> str:
        lines = [f"{kind}: {self.chosen or 'none'}"]
        lines += [f"  chosen: {self.reason}"] if self.reason else []
        lines += [f"  refused {name}: {why}" for name, why in self.refused.items()]
        return "\n".join(lines)


def choose_platform(plugins: PluginSet, requested: str = "auto") -> tuple[Platform, Choice]:
    choice = Choice()
    candidates: list[tuple[int, str, type[Platform]]] = []
    for name in plugins.names("platforms"):
        try:
            cls = plugins.load("platforms", name)
        except PluginError as exc:
            choice.refused[name] = str(exc)
            continue
        if requested not in ("auto", name):
            choice.refused[name] = f"not requested (device={requested!r})"
            continue
        try:
            available = cls.is_available()
        except Exception as exc:  # a detector must never take the engine down
            choice.refused[name] = f"is_available() raised {exc!r}"
            continue
        if not available:
            choice.refused[name] = cls.unavailable_reason()
            continue
        candidates.append((cls.priority, name, cls))
    if not candidates:
        detail = "; ".join(f"{n}: {why}" for n, why in choice.refused.items()) or "none installed"
        raise ConfigError(
            f"no usable platform for device={requested!r} ({detail}). "
            "Install one, e.g. `pip install tessellm-cpu`."
        )
    candidates.sort(key=lambda item: -item[0])
    _, name, cls = candidates[0]
    for _, other, _ in candidates[1:]:
        choice.refused[other] = f"lower priority than {name}"
    choice.chosen = name
    try:
        choice.reason = cls.available_reason()
    except Exception as exc:  # as is_available: a detector never takes the engine down
        choice.reason = f"available_reason() raised {exc!r}"
    return cls(), choice


def choose_attention_backend(
    plugins: PluginSet, platform: Platform, spec: AttentionSpec, requested: str | None = None
) -> tuple[type[AttentionBackend], Choice]:
    choice = Choice()
    order = [requested] if requested else list(platform.attention_backends)
    if not requested:
        order += [n for n in plugins.names("attention_backends") if n not in order]
    for name in order:
        if plugins.get("attention_backends", name) is None:
            choice.refused[name] = "not installed"
            continue
        try:
            cls = plugins.load("attention_backends", name)
        except PluginError as exc:
            choice.refused[name] = str(exc)
            continue
        reasons = cls.validate(spec)
        if reasons:
            choice.refused[name] = "; ".join(reasons)
            continue
        choice.chosen = name
        return cls, choice
    raise ConfigError(
        "no attention backend can serve this model here:\n" + choice.explain("attention")
    )


# Checkpoint formats whose weight format can also hand out dense weights, so a method that
# does not read the format may still load the checkpoint (dequantized on load).
DEQUANTIZABLE_FORMATS = ("gguf",)


@dataclass
class QuantizationChoice:
    """The method for a model and why: ``checkpoint_config`` is the checkpoint's
    ``quantization_config`` (None: dense); ``dequantize`` means the chosen method does not
    read its format, so the weight format must dequantize it on load."""

    name: str
    reason: str
    checkpoint_config: dict[str, Any] | None = None
    dequantize: bool = False

    def method_config(self) -> dict[str, Any] | None:
        """What ``from_config`` receives: the checkpoint's quantization config when the
        method reads it, else None."""
        return None if self.dequantize else self.checkpoint_config


def checkpoint_quantization(config: Any) -> dict[str, Any] | None:
    """A checkpoint config's ``quantization_config`` as a dict (None: a dense checkpoint)."""
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is None and getter is not None:
        qc = getattr(getter(), "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc if qc.get("quant_method") else None


def _format_of(qc: dict[str, Any]) -> str:
    return str(qc["quant_method"]).lower()


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability ``validate`` receives (None off CUDA)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def methods_reading(plugins: PluginSet, checkpoint_format: str) -> list[str]:
    """Registered methods whose capabilities say they load ``checkpoint_format``; the one
    named as the format first."""
    readers = [
        name
        for name in plugins.names("quantization_methods")
        if checkpoint_format in _capabilities(plugins, name).checkpoint_formats
    ]
    return sorted(readers, key=lambda name: name != checkpoint_format)


def _capabilities(plugins: PluginSet, name: str) -> QuantCapabilities:
    try:
        cls = plugins.load("quantization_methods", name)
    except PluginError:
        return QuantCapabilities()
    return getattr(cls, "capabilities", QuantCapabilities())


def _prefers(plugins: PluginSet, name: str, dtype: torch.dtype) -> bool:
    preferred = _capabilities(plugins, name).preferred_dtypes
    return preferred is None or dtype in preferred


def _check_loads_dense(plugins: PluginSet, requested: str) -> None:
    caps = _capabilities(plugins, requested)
    if caps.loads_dense or plugins.get("quantization_methods", requested) is None:
        return
    online = [
        name
        for name in plugins.names("quantization_methods")
        if name != "none" and _capabilities(plugins, name).loads_dense
    ]
    raise ConfigError(
        f"quantization {requested!r} loads {'/'.join(caps.checkpoint_formats)} checkpoints, "
        "and this checkpoint is dense; methods that quantize a dense checkpoint on load: "
        f"{', '.join(online) or 'none installed'}"
    )


def choose_quantization(
    plugins: PluginSet,
    platform: Platform,
    dtype: torch.dtype,
    requested: str | None = None,
    config: Any = None,
) -> QuantizationChoice:
    """A quantized checkpoint's own method (its ``quant_method``), else the user's method,
    else the platform's default for ``dtype`` where it is installed, else ``"none"``.

    The user may name another method for a checkpoint only where that method reads its
    format, or the format is one its weight format dequantizes (GGUF)."""
    qc = checkpoint_quantization(config)
    fmt = _format_of(qc) if qc else None
    if fmt is None:
        if requested:
            _check_loads_dense(plugins, requested)
            return QuantizationChoice(requested, "requested")
        name = platform.default_quantization(dtype)
        if name and plugins.get("quantization_methods", name):
            return QuantizationChoice(name, "the platform's default for this dtype")
        return QuantizationChoice("none", "dense checkpoint")
    readers = methods_reading(plugins, fmt)
    if requested:
        if requested in readers:
            return QuantizationChoice(requested, "requested", qc)
        if fmt in DEQUANTIZABLE_FORMATS:
            reason = f"requested; the {fmt} weights are dequantized on load"
            return QuantizationChoice(requested, reason, qc, dequantize=True)
        raise ConfigError(
            f"the checkpoint is quantized with {fmt!r}; quantization={requested!r} cannot "
            f"load it (methods that can: {', '.join(readers) or 'none installed'})"
        )
    if fmt in DEQUANTIZABLE_FORMATS:
        preferred = [r for r in readers if _prefers(plugins, r, dtype)]
        if not preferred:
            fallback = choose_quantization(plugins, platform, dtype)
            if readers:
                dtype_name = str(dtype).removeprefix("torch.")
                reason = (
                    f"{fmt} weights dequantized on load: {readers[0]!r} is not preferred in "
                    f"{dtype_name} (the dense model is faster there; ask for it by name)"
                )
            else:
                reason = f"no installed method reads {fmt} weights: dequantized on load"
            return QuantizationChoice(fallback.name, reason, qc, dequantize=True)
        readers = preferred
    if readers:
        return QuantizationChoice(readers[0], f"the checkpoint's quant_method {fmt!r}", qc)
    raise ModelLoadError(
        f"the checkpoint is quantized with {fmt!r}, which no installed quantization method "
        "reads. " + plugins.install_hint(fmt, "quantization_methods")
    )


def default_dtype_for(
    plugins: PluginSet, platform: Platform, config: Any, requested: str | None = None
) -> torch.dtype:
    """What ``dtype="auto"`` means for this checkpoint: the platform's default, unless the
    checkpoint is in a format whose reading method prefers other run dtypes (GGUF's int4
    CPU kernels are fast in bf16 only) and the platform supports one of them."""
    base = platform.default_dtype()
    qc = checkpoint_quantization(config)
    if qc is None:
        return base
    readers = methods_reading(plugins, _format_of(qc))
    if not readers or (requested and requested not in readers):
        return base
    preferred = _capabilities(plugins, readers[0]).preferred_dtypes
    if not preferred or base in preferred:
        return base
    supported = platform.supported_dtypes()
    return next((dtype for dtype in preferred if dtype in supported), base)


def build_quantization(
    plugins: PluginSet,
    choice: QuantizationChoice,
    device: torch.device,
    dtype: torch.dtype,
) -> QuantizationMethod:
    """The chosen method, built from the checkpoint's config and checked against where it
    runs; a ``ConfigError`` carries the reasons it cannot."""
    cls = plugins.load("quantization_methods", choice.name)
    try:
        method = cls.from_config(choice.method_config())
    except ValueError as exc:
        raise ConfigError(f"quantization method {choice.name!r}: {exc}") from None
    reasons = method.validate(device.type, dtype, cuda_capability(device))
    if reasons:
        raise ConfigError(
            f"quantization method {choice.name!r} cannot run here: " + "; ".join(reasons)
        )
    return method
