"""Collectives over the tensor-parallel group (no-ops at world size 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tessellm.interfaces.model import ParallelInfo


def all_reduce(x: torch.Tensor, parallel: ParallelInfo) -> torch.Tensor:
    if parallel.world_size > 1:
        dist.all_reduce(x, group=parallel.group)
    return x


def all_gather_last_dim(x: torch.Tensor, parallel: ParallelInfo) -> torch.Tensor:
    if parallel.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(parallel.world_size)]
    dist.all_gather(parts, x.contiguous(), group=parallel.group)
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator
