"""The gated MLP: ``down(act(gate(x)) * up(x))`` with gate and up in one matrix.

Its steps are methods (the projection ``gate_up_proj``, :meth:`GatedMLP.activate`,
:meth:`GatedMLP.down`) so that a fused kernel that computes some of them (a norm folded
into the gate/up projection, the SiLU in its epilogue) hands over to the module's own
code for the rest. A subclass that overrides ``forward`` is never fused (its ``forward``
runs); one that overrides ``activate`` keeps the fused projection but not the fused SiLU.
"""

from __future__ import annotations

import torch
from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.interfaces.ops import FusedOps, runs_methods_of
from tessellm.layers.activation import GatedActivation
from tessellm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)


def runs_plain_linear(linear: nn.Module) -> bool:
    """A column-parallel layer running its own matmul: what a linear-fused entry replaces
    (not while LoRA adapters add to its output this step)."""
    lora = getattr(linear, "lora", None)
    if lora is not None and lora.step.active:
        return False
    return runs_methods_of(linear, ColumnParallelLinear, "forward", "_matmul")


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one column-parallel matrix."""

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        ctx: ModelContext,
        activation: str = "silu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], ctx, bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ctx, bias=bias)
        self.act = GatedActivation(activation)

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` of the gate/up projection's output ``[T, 2I]`` → ``[T, I]``."""
        return self.act(gate_up)

    def down(self, activated: torch.Tensor) -> torch.Tensor:
        """The output projection of the activated ``[T, I]`` → ``[T, hidden]``."""
        return self.down_proj(activated)

    @property
    def silu_fusable(self) -> bool:
        """Whether ``activate`` is exactly ``silu(gate) * up``, which a fused SiLU-and-mul
        epilogue may compute instead (not where a subclass changes ``activate``)."""
        return (
            runs_methods_of(self, GatedMLP, "activate")
            and runs_methods_of(self.act, GatedActivation, "forward")
            and self.act.is_silu
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.fused_ops
        fused = ops.linear_silu_and_mul if ops is not None else None
        if fused is not None and self.silu_fusable and runs_plain_linear(self.gate_up_proj):
            activated = fused(self.gate_up_proj, x)
            if activated is not None:
                return self.down(activated)
        return self.down(self.activate(self.gate_up_proj(x)))
