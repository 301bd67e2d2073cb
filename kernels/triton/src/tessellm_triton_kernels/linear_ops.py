"""The ``FusedOps`` entries that fold row-wise work into a linear layer's GEMV.

They apply where the layer would multiply on the Triton GEMV anyway: a column-parallel
layer whose quantization method is ``unquantized_gemv`` and an input it sends to the GEMV
(one row, on the GPU, in bf16/fp16), of at most ``norm_gemv.MAX_K`` columns. Anywhere
else they return None and the layers run their usual code, so prompts, larger batches
and fp32 are untouched. Both run the persistent kernel of ``norm_gemv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tessellm.layers.linear import ColumnParallelLinear
from tessellm.layers.norm import RMSNorm

from .dense_gemv import UnquantizedGemv
from .norm_gemv import MAX_K, PersistentGemvConfig, norm_gemv


def _gemv_operands(
    linear: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The layer's dense weight and bias where its method runs this input on the GEMV."""
    if not isinstance(linear, ColumnParallelLinear) or linear.gather_output:
        return None
    quant = linear.quant
    if not isinstance(quant, UnquantizedGemv) or not quant.runs_gemv(x, linear.weight):
        return None
    if linear.weight.shape[1] > MAX_K:  # the row must fit the kernel's registers
        return None
    return linear.weight, linear.bias


def _is_gate_up(linear: nn.Module) -> bool:
    sizes = getattr(linear, "out_sizes", None)
    return sizes is not None and len(sizes) == 2 and sizes[0] == sizes[1]


@dataclass(frozen=True, slots=True)
class LinearFusions:
    """The two entries, with the tile shapes they launch (None: the kernel's defaults)."""

    norm_config: PersistentGemvConfig | None = None
    silu_config: PersistentGemvConfig | None = None

    def linear_silu_and_mul(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        operands = _gemv_operands(linear, x)
        if operands is None or not _is_gate_up(linear):
            return None
        weight, bias = operands
        return norm_gemv(x, weight, bias, silu_and_mul=True, config=self.silu_config)[0]

    def rms_norm_linear(
        self,
        norm: nn.Module,
        linear: nn.Module,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        silu_and_mul: bool,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        operands = _gemv_operands(linear, x)
        if operands is None or not isinstance(norm, RMSNorm) or norm.weight.dtype != x.dtype:
            return None
        if silu_and_mul and not _is_gate_up(linear):
            return None
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
            return None
        weight, bias = operands
        return norm_gemv(
            x,
            weight,
            bias,
            residual=residual,
            norm_weight=norm.weight,
            eps=float(norm.eps),
            norm_offset=float(norm.offset),
            silu_and_mul=silu_and_mul,
            config=self.silu_config if silu_and_mul else self.norm_config,
        )
