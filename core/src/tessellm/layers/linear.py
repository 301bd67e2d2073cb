"""Linear layers that know how they are split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice);
row-parallel layers split the input features and all-reduce the partial sums. Weights are
sharded as they load, so no rank ever holds a full matrix. The quantization method owns
how the weight is stored and multiplied.
"""

from __future__ import annotations

import torch
from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.layers.parallel import all_gather_last_dim, all_reduce, divide


class _ParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ModelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.parallel = ctx.parallel
        self.in_features = in_features
        self.out_features = out_features
        self.quant = ctx.quantization
        self.quant.create_weights(self, in_features, out_features, ctx.dtype)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=ctx.dtype), requires_grad=False)
            if bias
            else None
        )

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.quant.apply(self, x, bias)


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split along its output rows."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ctx: ModelContext,
        bias: bool = False,
        gather_output: bool = False,
    ) -> None:
        super().__init__(in_features, divide(out_features, ctx.parallel.world_size), bias, ctx)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.parallel.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        return all_gather_last_dim(y, self.parallel) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (e.g. gate and up)."""

    def __init__(
        self, in_features: int, out_sizes: list[int], ctx: ModelContext, bias: bool = False
    ) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), ctx, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        tp = self.parallel.world_size
        offset = sum(self.out_sizes[:shard]) // tp
        size = self.out_sizes[shard] // tp
        part = loaded.narrow(0, self.parallel.rank * size, size)
        param.data.narrow(0, offset, size).copy_(part)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, split by heads across ranks.

    When there are fewer KV heads than ranks, each KV head is replicated on several ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        num_heads: int,
        num_kv_heads: int,
        ctx: ModelContext,
        bias: bool = False,
    ) -> None:
        tp = ctx.parallel.world_size
        self.head_size = head_size
        self.num_heads = divide(num_heads, tp)
        self.kv_replicas = max(1, divide(tp, num_kv_heads) if num_kv_heads < tp else 1)
        self.num_kv_heads = max(1, num_kv_heads // tp)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp
        super().__init__(hidden_size, out, ctx, bias=bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        rank = self.parallel.rank
        if shard == "q":
            offset, size, index = 0, self.q_size, rank
        else:
            offset = self.q_size + (0 if shard == "k" else self.kv_size)
            size, index = self.kv_size, rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, index * size, size))


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split along its input columns; partial sums all-reduced."""

    def __init__(
        self, in_features: int, out_features: int, ctx: ModelContext, bias: bool = False
    ) -> None:
        super().__init__(divide(in_features, ctx.parallel.world_size), out_features, bias, ctx)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded)
            return
        cols = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.parallel.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, None)
        y = all_reduce(y, self.parallel)
        return y + self.bias if self.bias is not None else y


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)
