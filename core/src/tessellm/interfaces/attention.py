"""Attention backends: capabilities as data, refusals as reasons, paged KV as the contract.

KV cache layout every backend shares (one pair per layer)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_size]

Token ``i`` of a batch is written to ``slot_mapping[i]`` = ``block_id * block_size +
offset``; a slot of ``-1`` means "do not write" (padding). The batch is packed: the query
tokens of sequence ``s`` are rows ``query_start_loc[s]:query_start_loc[s+1]`` and sit at
the last positions of its context, i.e. positions ``seq_lens[s] - q_len .. seq_lens[s]-1``.
A query at position ``p`` sees keys at positions ``k <= p`` and, when the layer has a
sliding window ``W``, only those with ``p - k < W``.

An fp8 KV cache (``AttentionSpec.kv_cache_dtype`` other than ``"auto"``) stores
``k / k_scale`` and ``v / v_scale`` (clamped to the format's largest finite value) as
``torch.float8_e4m3fn`` or ``torch.float8_e5m2``; reading multiplies back. The scales are
per layer, fp32 tensors of one element on the device, handed to ``write_kv`` and
``forward`` as ``k_scale``/``v_scale`` only when the cache is fp8.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# vLLM's ``kv_cache_dtype`` names and the dtype each stores ("auto": the model's dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def canonical_kv_cache_dtype(name: str) -> str:
    """The name backends declare and specs carry: ``"fp8"`` is ``"fp8_e4m3"``."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}: one of {', '.join(KV_CACHE_DTYPES)}")
    return "fp8_e4m3" if name == "fp8" else name


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """What a KV cache of ``kv_cache_dtype`` ``name`` stores for a model run in ``model_dtype``."""
    return KV_CACHE_DTYPES[canonical_kv_cache_dtype(name)] or model_dtype


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True, slots=True)
class AttentionCapabilities:
    """What a backend can serve. ``None`` for a field means "any"."""

    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    head_sizes: tuple[int, ...] | None = None
    block_sizes: tuple[int, ...] | None = None
    sliding_window: bool = True
    logits_soft_cap: bool = True
    # KV cache storage a backend reads and writes (names as canonical_kv_cache_dtype gives).
    kv_cache_dtypes: frozenset[str] = frozenset({"auto"})


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
    kv_cache_dtype: str = "auto"  # canonical: "auto", "fp8_e4m3" or "fp8_e5m2"


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
    # KV groups 1.. of a layout with several (engine/cache_layout.py): the same batch with
    # that group's ``block_tables``/``slot_mapping`` (and its own ``prepare``); a layer of
    # group ``g`` reads ``kv_groups[g - 1]``. Empty for one group.
    kv_groups: tuple[AttentionMetadata, ...] = ()
    # Recurrent layers (tessellm.interfaces.cache_spec.StatefulLayer): each sequence's
    # state slot, int64 [num_seqs] on the device; None where the model has none.
    state_slots: torch.Tensor | None = None

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
        kv_dtype = canonical_kv_cache_dtype(spec.kv_cache_dtype)
        if kv_dtype not in caps.kv_cache_dtypes:
            supported = ", ".join(sorted(caps.kv_cache_dtypes))
            reasons.append(f"KV cache dtype {kv_dtype} not supported (supports: {supported})")
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
        *,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """Store this step's ``key``/``value`` ``[T, Hkv, D]`` at ``metadata.slot_mapping``.

        ``k_scale``/``v_scale`` come only with an fp8 cache (see the module docstring);
        a backend without fp8 in ``kv_cache_dtypes`` may leave them out of its signature."""

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
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[T, H, D]`` over the cache (this step's KV already written).

        Returns ``[T, H, D]``. Soft-capping applies ``cap * tanh(scores / cap)`` to the
        scaled scores before the softmax. ``k_scale``/``v_scale``: as for ``write_kv``.
        """
