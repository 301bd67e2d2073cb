"""Choosing a platform and an attention backend, recording why each candidate was refused."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessellm.errors import ConfigError
from tessellm.interfaces.attention import AttentionBackend, AttentionSpec
from tessellm.interfaces.platform import Platform
from tessellm.plugins import PluginError, PluginSet


@dataclass
class Choice:
    chosen: str | None = None
    refused: dict[str, str] = field(default_factory=dict)

    def explain(self, kind: str) -> str:
        lines = [f"{kind}: {self.chosen or 'none'}"]
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


def choose_quantization(
    plugins: PluginSet, platform: Platform, dtype: torch.dtype, requested: str | None = None
) -> str:
    """The user's method, else the platform's default for ``dtype`` where it is installed,
    else ``"none"``."""
    if requested:
        return requested
    name = platform.default_quantization(dtype)
    return name if name and plugins.get("quantization_methods", name) else "none"
