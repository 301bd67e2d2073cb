"""The plain (ungated) feed-forward block: ``fc2(act(fc1(x)))`` with optional biases."""

from __future__ import annotations

import torch
from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.layers.activation import get_activation
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """GPT-2's and OPT's feed-forward: column-parallel up, activation, row-parallel down."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        ctx: ModelContext,
        activation: str = "gelu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(hidden_size, intermediate_size, ctx, bias=bias)
        self.fc2 = RowParallelLinear(intermediate_size, hidden_size, ctx, bias=bias)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
