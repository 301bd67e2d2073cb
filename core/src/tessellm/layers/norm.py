"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn

from tessellm.interfaces.ops import FusedOps, runs_methods_of


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; ``offset=1`` for Gemma's ``(1 + weight)`` convention.

    ``forward(x, residual)`` adds the residual first and returns ``(normed, new_residual)``,
    the fused form a backend kernel can replace (unless a subclass changes ``_norm``).
    """

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        dtype: torch.dtype = torch.float32,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ops = self.fused_ops
        if (
            ops is not None
            and x.dtype == self.weight.dtype
            and runs_methods_of(self, RMSNorm, "_norm")
        ):
            if residual is None and ops.rms_norm is not None:
                return ops.rms_norm(x, self.weight, self.eps, self.offset)
            if residual is not None and ops.add_rms_norm is not None:
                return ops.add_rms_norm(x, residual, self.weight, self.eps, self.offset)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm without gradients (kept here so families import one module)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype = torch.float32):
        super().__init__(hidden_size, eps=eps, dtype=dtype)
        self.requires_grad_(False)
