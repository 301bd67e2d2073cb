"""Fused kernels a platform may offer to the shared layers, as a table of functions.

The shared layers (``RMSNorm``, ``GatedActivation``, ``RotaryEmbedding``) carry a
``fused_ops`` attribute, ``None`` by default, and use their plain torch code unless the
table they were bound to has an entry for their operation. The model runner binds the
platform's table once after building the model (:func:`bind_fused_ops`); nothing is
patched and nothing is read from global state. An entry must compute the same function as
the torch code it replaces (the same roundings to the model dtype, where it matters: the
residual stream exactly; an input that a fused matrix product reads may skip a rounding,
as a differently ordered sum would change its last bits anyway).

Some entries span layers: ``rotary_neox_write_kv`` (``Attention``) and the linear-fused
forms (``DecoderLayer``, ``GatedMLP``) take the modules whose work they merge.

An entry replaces the code of the class it was written for, so a layer uses it only where
the module at hand runs that code (:func:`runs_methods_of`): a family's subclass that
overrides a replaced method (a multiplier in an MLP's ``forward``, another norm) runs its
own method, unfused, never the base class's kernel.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True, slots=True)
class LoRATokens:
    """A step's tokens grouped by LoRA adapter slot, built once per step for every layer.

    ``slots`` ``[T]`` int32: each token's slot, -1 for none. ``order`` ``[T]`` int32: the
    token indices sorted by slot (stably; the tokens without an adapter last); slot ``s``'s
    tokens are ``order[starts[s]:starts[s + 1]]`` (``starts`` ``[S + 1]`` int32). On the
    host: ``max_tokens_per_slot``, an upper bound on any slot's token count (``T`` is
    always one; a kernel sizes its grid by it, so a CUDA graph captured with ``T`` serves
    every layout of that size).
    """

    slots: Tensor
    order: Tensor
    starts: Tensor
    max_tokens_per_slot: int


@dataclass(frozen=True, slots=True)
class FusedOps:
    """Each field is ``None`` (use the torch code) or a function with this contract."""

    # (x [T, H], residual [T, H], weight [H], eps, offset) -> (norm(x + residual), x + residual)
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float, float], tuple[Tensor, Tensor]] | None = (
        None
    )
    # (x [T, H], weight [H], eps, offset) -> norm(x)
    rms_norm: Callable[[Tensor, Tensor, float, float], Tensor] | None = None
    # (x [T, 2I] laid out [gate | up]) -> silu(gate) * up  [T, I]
    silu_and_mul: Callable[[Tensor], Tensor] | None = None
    # (positions [T], q [T, Hq, D], k [T, Hk, D], cos [P, D/2], sin [P, D/2]) -> (q', k'),
    # neox-style rotation of the whole head (the two halves rotate together)
    rotary_neox: (
        Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None
    ) = None
    # (positions, q [T, Hq, D], k [T, Hk, D], v [T, Hk, D], cos, sin, k_cache, v_cache,
    # slot_mapping) -> q': rotary_neox of q and k, and k', v stored at their slots in the
    # shared cache layout (interfaces/attention.py; slot -1: not stored), in one pass.
    rotary_neox_write_kv: (
        Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
        | None
    ) = None
    # The entries below merge work across modules, so they take the modules and return
    # None where they do not apply to them or to this input (a kernel for one-row inputs,
    # say); the caller then runs the modules as usual.
    # (linear, x) -> silu(gate) * up of linear(x), for a linear layer whose output is
    # [gate | up] (MergedColumnParallelLinear of two equal parts).
    linear_silu_and_mul: Callable[[nn.Module, Tensor], Tensor | None] | None = None
    # (norm, linear, x, residual | None, silu_and_mul) -> (linear(norm(x + residual)),
    # x + residual): an RMSNorm folded into the linear layer after it, the residual add
    # included (without a residual, the second result is x). With silu_and_mul (asked only
    # where the table has linear_silu_and_mul), the first result is silu(gate) * up of it.
    rms_norm_linear: (
        Callable[[nn.Module, nn.Module, Tensor, Tensor | None, bool], tuple[Tensor, Tensor] | None]
        | None
    ) = None

    # Batched multi-LoRA (Punica/S-LoRA's shrink and expand), each token adapted by its own
    # slot's matrices (``tokens``: :class:`LoRATokens`). Entries must accept any layout.
    # (x [T, K], a [S, R, K], tokens, scale) -> [T, R] fp32: row t is x_t a[s_t]^T * scale,
    # zero where s_t = -1.
    lora_shrink: Callable[[Tensor, Tensor, LoRATokens, float], Tensor] | None = None
    # (u [T, R], b [S, N, R], out [T, >= offset + N], tokens, offset) -> out, in place:
    # out[t, offset:offset + N] += u_t b[s_t]^T (rows with s_t = -1 untouched); the offset
    # lets each piece of a fused layer (q/k/v, gate/up) write its own output columns.
    lora_expand: Callable[[Tensor, Tensor, Tensor, LoRATokens, int], Tensor] | None = None

    def names(self) -> list[str]:
        """The operations this table provides."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def bind_fused_ops(model: nn.Module, ops: FusedOps | None) -> int:
    """Give every module that declares ``fused_ops`` this table; returns how many took it."""
    bound = 0
    for module in model.modules():
        if hasattr(module, "fused_ops"):
            module.fused_ops = ops
            bound += 1
    return bound


@functools.cache
def _class_runs_methods_of(cls: type, base: type, methods: tuple[str, ...]) -> bool:
    # getattr_static: the function objects themselves (a plain getattr makes a new bound
    # object for a classmethod); per class, since checks run in every forward.
    return issubclass(cls, base) and all(
        inspect.getattr_static(cls, name) is inspect.getattr_static(base, name) for name in methods
    )


def runs_methods_of(module: object, base: type, *methods: str) -> bool:
    """Whether ``module`` is a ``base`` whose class keeps ``base``'s own ``methods``.

    The condition for a fused entry written for ``base`` to stand in for those methods:
    ``base`` itself, or a subclass that overrides none of them (a rotary subclass that
    only changes its tables keeps the fused rotary; one that changes ``_rotate`` does not).
    """
    return _class_runs_methods_of(type(module), base, methods)
