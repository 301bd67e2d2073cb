"""Attention backends: capabilities as data, refusals as reasons, paged KV as the contract.

KV cache layout every backend shares (one pair per layer)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_size]

Token ``i`` of a batch is written to ``slot_mapping[i]`` = ``block_id * block_size +
offset``; a slot of ``-1`` means "do not write" (padding). The batch is packed: the query
tokens of sequence ``s`` are rows ``query_start_loc[s]:query_start_loc[s+1]`` and sit at
the last positions of its context, i.e. positions ``seq_lens[s] - q_len .. seq_lens[s]-1``.
A query at position ``p`` sees keys at positions ``k <= p`` and, when the layer has a
sliding window ``W``, only those with ``p - k < W``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True, slots=True)
class AttentionCapabilities:
    """What a backend can serve. ``None`` for a field means "any"."""

    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    head_sizes: tuple[int, ...] | None = None
    block_sizes: tuple[int, ...] | None = None
    sliding_window: bool = True
    logits_soft_cap: bool = True


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """What a model on a platform asks of attention; backends ``validate`` against it."""

    device_type: str
    dtype: torch.dtype
    head_size: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    sliding_window: bool = False
    logits_soft_cap: bool = False


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step description of the packed batch, shared by every layer of the step."""

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], on the device
    seq_lens: torch.Tensor  # int32 [num_seqs], context length after this step
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    # Whatever the backend's ``prepare`` adds (split plans, workspaces ...).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens_cpu.shape[0])


class AttentionBackend(ABC):
    """Runs attention over the paged KV cache for one platform's device."""

    name: ClassVar[str]
    capabilities: ClassVar[AttentionCapabilities]
    # True when ``write_kv``/``forward`` read no device values on the host and depend on
    # host-side metadata only through what ``prepare`` fixed, so a decode step can be
    # captured once (as a CUDA graph) and replayed with new tensor contents.
    graph_capturable: ClassVar[bool] = False

    @classmethod
    def validate(cls, spec: AttentionSpec) -> list[str]:
        """Reasons this backend cannot serve ``spec``; empty when it can."""
        caps = cls.capabilities
        reasons = []
        if "*" not in caps.device_types and spec.device_type not in caps.device_types:
            reasons.append(f"device {spec.device_type!r} not in {sorted(caps.device_types)}")
        if spec.dtype not in caps.dtypes:
            reasons.append(f"dtype {spec.dtype} not supported")
        if caps.head_sizes is not None and spec.head_size not in caps.head_sizes:
            reasons.append(f"head size {spec.head_size} not in {list(caps.head_sizes)}")
        if caps.block_sizes is not None and spec.block_size not in caps.block_sizes:
            reasons.append(f"block size {spec.block_size} not in {list(caps.block_sizes)}")
        if spec.sliding_window and not caps.sliding_window:
            reasons.append("model uses a sliding window, backend has none")
        if spec.logits_soft_cap and not caps.logits_soft_cap:
            reasons.append("model uses attention logit soft-capping, backend has none")
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"{spec.num_heads} heads not a multiple of {spec.num_kv_heads}")
        return reasons

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    def prepare(self, metadata: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Called once per step before the forward pass; may fill ``metadata.extra``."""

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        """Store this step's ``key``/``value`` ``[T, Hkv, D]`` at ``metadata.slot_mapping``."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[T, H, D]`` over the cache (this step's KV already written).

        Returns ``[T, H, D]``. Soft-capping applies ``cap * tanh(scores / cap)`` to the
        scaled scores before the softmax.
        """
