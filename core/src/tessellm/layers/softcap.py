"""Logit soft-capping: ``cap * tanh(x / cap)`` squashes values smoothly into ``(-cap, cap)``."""

from __future__ import annotations

import torch


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``x`` soft-capped at ``cap``; unchanged when ``cap`` is ``None`` or 0."""
    if not cap:
        return x
    return torch.tanh(x / cap) * cap
