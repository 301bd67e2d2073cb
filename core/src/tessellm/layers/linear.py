"""Linear layers that know how they are split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice);
row-parallel layers split the input features and all-reduce the partial sums. Weights are
sharded as they load, so no rank ever holds a full matrix. The quantization method owns
how the weight is stored and multiplied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.interfaces.quantization import input_dim_of, output_dim_of
from tessellm.layers.parallel import all_gather_last_dim, all_reduce, divide


def _place_output_shard(
    layer: _ParallelLinear,
    param: nn.Parameter,
    loaded: torch.Tensor,
    shard_index: int,
    offset: int,
    size: int,
    source_index: int,
) -> None:
    """Copy part ``source_index`` (of ``size`` output features) of a checkpoint tensor into
    output features ``[offset, offset + size)`` of this rank's ``param``, in the param's
    stored layout (packed or grouped along its output dimension; see
    :mod:`tessellm.interfaces.quantization`)."""
    custom = getattr(param, "load_shard", None)
    if custom is not None:
        custom(layer, loaded, shard_index, source_index)
        return
    if getattr(param, "shard_indexed", False):
        param.data[shard_index].copy_(loaded.reshape(()))
        return
    dim = output_dim_of(param)
    if dim is None:  # the same for every shard (e.g. g_idx): any copy will do
        param.data.copy_(loaded.reshape(param.shape))
        return
    stored = param.shape[dim]
    if stored * size % layer.out_features or stored * offset % layer.out_features:
        raise ValueError(
            f"a fused shard of {size} output features at {offset} does not fall on the "
            f"stored layout of a parameter with {stored} entries for {layer.out_features}"
        )
    size_s = stored * size // layer.out_features
    offset_s = stored * offset // layer.out_features
    part = loaded.narrow(dim, source_index * size_s, size_s)
    param.data.narrow(dim, offset_s, size_s).copy_(part)


class _ParallelLinear(nn.Module):
    # Multi-LoRA (tessellm.lora.slots.LayerLoRA), set when the engine runs with enable_lora.
    lora: Any = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        ctx: ModelContext,
        output_shard_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.parallel = ctx.parallel
        self.in_features = in_features
        self.out_features = out_features
        # This rank's output features of each checkpoint matrix fused into this layer.
        self.output_shard_sizes = output_shard_sizes or [out_features]
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
        rank_shard_sizes: list[int] | None = None,
    ) -> None:
        """``rank_shard_sizes``: for a fused layer, this rank's output features of each
        checkpoint matrix it holds (default: one matrix)."""
        out_here = divide(out_features, ctx.parallel.world_size)
        super().__init__(in_features, out_here, bias, ctx, rank_shard_sizes)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rank = self.parallel.rank
        _place_output_shard(self, param, loaded, 0, 0, self.out_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        lora = self.lora
        if lora is not None and lora.step.active:
            y = lora.expand(lora.shrink(x), y)
        return all_gather_last_dim(y, self.parallel) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (e.g. gate and up)."""

    def __init__(
        self, in_features: int, out_sizes: list[int], ctx: ModelContext, bias: bool = False
    ) -> None:
        self.out_sizes = out_sizes
        tp = ctx.parallel.world_size
        rank_sizes = [divide(size, tp) for size in out_sizes]
        super().__init__(in_features, sum(out_sizes), ctx, bias=bias, rank_shard_sizes=rank_sizes)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        tp = self.parallel.world_size
        offset = sum(self.out_sizes[:shard]) // tp
        size = self.out_sizes[shard] // tp
        _place_output_shard(self, param, loaded, shard, offset, size, self.parallel.rank)


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
        q, kv = self.num_heads * head_size, self.num_kv_heads * head_size
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp
        super().__init__(hidden_size, out, ctx, bias=bias, rank_shard_sizes=[q, kv, kv])

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
        shard_index = "qkv".index(shard)
        _place_output_shard(self, param, loaded, shard_index, offset, size, index)


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W split along its input columns; partial sums all-reduced."""

    def __init__(
        self, in_features: int, out_features: int, ctx: ModelContext, bias: bool = False
    ) -> None:
        super().__init__(divide(in_features, ctx.parallel.world_size), out_features, bias, ctx)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        custom = getattr(param, "load_shard", None)
        if custom is not None:
            custom(self, loaded, 0, self.parallel.rank)
            return
        dim = input_dim_of(param)
        if dim is None:  # the bias (added once, after the reduction), per-output scales
            param.data.copy_(loaded.reshape(param.shape))
            return
        size = param.shape[dim]  # this rank's inputs in the stored (packed, grouped) layout
        param.data.copy_(loaded.narrow(dim, self.parallel.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, None)
        lora = self.lora
        shrunk = lora.reduce(lora.shrink(x)) if lora is not None and lora.step.active else None
        y = all_reduce(y, self.parallel)
        if shrunk is not None:
            y = lora.expand(shrunk, y)
        return y + self.bias if self.bias is not None else y


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)
