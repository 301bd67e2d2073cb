"""The table of fused operations a GPU platform hands to the shared layers."""

from __future__ import annotations

from collections.abc import Iterable

from tessellm.interfaces.ops import FusedOps

from .activation import silu_and_mul
from .norm import add_rms_norm, rms_norm
from .rotary import rotary_neox

ALL_OPS: dict[str, object] = {
    "add_rms_norm": add_rms_norm,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_neox": rotary_neox,
}


def triton_fused_ops(names: Iterable[str] | None = None) -> FusedOps:
    """A table with the named operations (all of them when ``names`` is None)."""
    chosen = list(ALL_OPS) if names is None else list(names)
    unknown = sorted(set(chosen) - set(ALL_OPS))
    if unknown:
        raise ValueError(f"unknown fused op(s) {unknown}; known: {sorted(ALL_OPS)}")
    return FusedOps(**{name: ALL_OPS[name] for name in chosen})
