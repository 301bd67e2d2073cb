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


def all_to_all_rows(
    rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], parallel: ParallelInfo
) -> torch.Tensor:
    """Send ``rows[sum(send_counts[:r]) : ...]`` to rank ``r`` and receive ``recv_counts[r]``
    rows from each rank ``r``, concatenated in rank order (uneven counts, zeros allowed).

    One path for every backend, on ``all_to_all_single``: NCCL implements it, and so does
    gloo (its ``alltoall_base``, uneven splits included; checked on torch 2.9 and 2.13 on the
    CPU). The list form ``dist.all_to_all`` is not used: gloo refuses it on torch 2.9
    ("Backend gloo does not support alltoall").
    """
    if parallel.world_size == 1:
        return rows
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=parallel.group)
    return out


def all_gather_rows(rows: torch.Tensor, counts: list[int], parallel: ParallelInfo) -> torch.Tensor:
    """Concatenate every rank's ``rows`` (rank ``r`` holds ``counts[r]`` of them) in rank
    order, on every rank. Padded to the largest count: gloo's all_gather wants equal sizes."""
    if parallel.world_size == 1:
        return rows
    width = max(counts)
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(parallel.world_size)]
    dist.all_gather(parts, padded, group=parallel.group)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
