"""The table of fused operations a GPU platform hands to the shared layers."""

from __future__ import annotations

from collections.abc import Iterable

from tessellm.interfaces.ops import FusedOps

from .activation import silu_and_mul
from .linear_ops import LinearFusions
from .lora import lora_expand, lora_shrink
from .norm import add_rms_norm, rms_norm
from .rotary import rotary_neox
from .rotary_kv import rotary_neox_write_kv

_DEFAULT_FUSIONS = LinearFusions()

ALL_OPS: dict[str, object] = {
    "add_rms_norm": add_rms_norm,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_neox": rotary_neox,
    "rotary_neox_write_kv": rotary_neox_write_kv,
    "linear_silu_and_mul": _DEFAULT_FUSIONS.linear_silu_and_mul,
    "rms_norm_linear": _DEFAULT_FUSIONS.rms_norm_linear,
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
}
LINEAR_OPS = ("linear_silu_and_mul", "rms_norm_linear")


def triton_fused_ops(
    names: Iterable[str] | None = None, fusions: LinearFusions | None = None
) -> FusedOps:
    """A table with the named operations (all of them when ``names`` is None); the
    GEMV-fused ones launch with ``fusions``' tile shapes (the defaults when None)."""
    chosen = list(ALL_OPS) if names is None else list(names)
    unknown = sorted(set(chosen) - set(ALL_OPS))
    if unknown:
        raise ValueError(f"unknown fused op(s) {unknown}; known: {sorted(ALL_OPS)}")
    table = {name: ALL_OPS[name] for name in chosen}
    if fusions is not None:
        for name in LINEAR_OPS:
            if name in table:
                table[name] = getattr(fusions, name)
    return FusedOps(**table)
