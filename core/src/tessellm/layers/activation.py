"""Activations, including the gated forms that take a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.ops import FusedOps

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


class GatedActivation(nn.Module):
    """``act(gate) * up`` over the last dim split in two halves ``[gate | up]``."""

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(self, name: str = "silu") -> None:
        super().__init__()
        self.act = get_activation(name)

    @property
    def is_silu(self) -> bool:
        """``act`` is SiLU: the function a fused ``silu_and_mul`` computes."""
        return self.act is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.fused_ops
        if self.is_silu and ops is not None and ops.silu_and_mul is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
