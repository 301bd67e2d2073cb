"""Paged attention backend built from Triton kernels (CUDA and ROCm).

``prepare`` decides once per step how ``forward`` runs for every layer: a batch whose
sequences all have a single query token goes to the decode kernel, split along the keys
when there are too few (sequence, KV head) pairs to fill the device; anything else goes to
the unified kernel, which handles prefill, chunked prefill and decode rows together.
Nothing in ``forward`` reads device values on the host, so it can be graph-captured.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
    AttentionSpec,
)

from .kernels.decode import decode_attention
from .kernels.prefill import prefill_attention
from .kernels.write_kv import write_kv

EXTRA_KEY = "triton_attention"


@dataclass(frozen=True, slots=True)
class TritonPlan:
    """Per-step launch decisions, kept in ``metadata.extra[EXTRA_KEY]``."""

    decode: bool
    num_splits: int
    # Decode kernel shape: keys per tile (0: by head size, ``kernels.common.tile_shape``)
    # and warps per program.
    decode_tile_n: int = 0
    decode_num_warps: int = 4
    # Split partials merged by the last split of each (sequence, KV head) rather than by a
    # second kernel (see kernels/decode.py).
    merge_in_decode: bool = False


# Where decode splits are merged: unset or "kernel" (the default), a second kernel;
# "last_split", the decode kernel's last split of each (sequence, KV head).
SPLIT_MERGE_ENV = "TESSELLM_TRITON_SPLIT_MERGE"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type in ("cuda", "hip"):
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # interpreter runs: only the split heuristic reads it


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dimension with unit stride; every other stride is free.
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonPagedAttention(AttentionBackend):
    name = "triton"
    graph_capturable = True  # see the module docstring: forward reads nothing on the host
    capabilities = AttentionCapabilities(
        device_types=frozenset({"cuda", "hip"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        head_sizes=tuple(range(32, 257, 8)),
        block_sizes=(16, 32, 64, 128),
        sliding_window=True,
        logits_soft_cap=True,
        kv_cache_dtypes=frozenset({"auto", "fp8_e4m3", "fp8_e5m2"}),
    )
    # Reading an fp8 e4m3 cache: with Triton's hardware conversion (True) or by bits
    # (False); None: by the device (kernels.common.native_e4m3).
    fp8_native: bool | None = None

    # Split-K knobs. A split should cover at least ``min_split_tokens`` keys so its fixed
    # cost (loading q, writing a partial) stays small next to the key loop; splitting
    # stops once about ``waves`` programs per SM are in flight. At batch 1 a layer's
    # attention is latency-bound (Llama-3-8B, 640 keys: 2.6 MB), so short splits pay:
    # 64 instead of 512 keys took the 32 layers from 511 to 247 us on an H200, with
    # graphs planned for max_model_len 1024 (bench/g2_levers.py decode).
    min_split_tokens: int = 64
    max_splits: int = 64
    waves: int = 2
    # Decode kernel shape (see TritonPlan); 0 keys per tile: by head size.
    decode_tile_n: int = 0
    decode_num_warps: int = 4
    # Where split partials are merged (TritonPlan.merge_in_decode). Merging in the decode
    # kernel saves a launch per layer but made Llama-3-8B's batch-1 attention slower on an
    # H200 (32 layers, 16 splits: 247 -> 341 us): the last split merges its 4 query heads
    # over the splits one after another, where the merge kernel has a program per head.
    merge_in_decode: bool = False

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        mode = os.environ.get(SPLIT_MERGE_ENV, "kernel").strip().lower()
        if mode not in ("last_split", "kernel"):
            raise ValueError(f"{SPLIT_MERGE_ENV} must be 'last_split' or 'kernel', got {mode!r}")
        self.merge_in_decode = mode == "last_split"
        # Zeroed counters for merging in the decode kernel, one per (sequence, KV head),
        # grown (never shrunk or freed: captured graphs keep using the ones they saw)
        # outside graph capture, by ``prepare``.
        self._merge_counters: list[torch.Tensor] = []

    def plan(self, metadata: AttentionMetadata, device: torch.device) -> TritonPlan:
        decode = metadata.max_query_len <= 1
        if not decode:
            return TritonPlan(decode=False, num_splits=1)
        programs = max(1, metadata.num_seqs * self.spec.num_kv_heads)
        by_occupancy = -(-self.waves * _num_sms(device) // programs)
        by_length = -(-metadata.max_seq_len // self.min_split_tokens)
        return TritonPlan(
            decode=True,
            num_splits=max(1, min(by_occupancy, by_length, self.max_splits)),
            decode_tile_n=self.decode_tile_n,
            decode_num_warps=self.decode_num_warps,
            merge_in_decode=self.merge_in_decode,
        )

    def merge_counters(self, num_seqs: int, device: torch.device) -> torch.Tensor:
        """Zeroed int32 counters for at least ``num_seqs`` sequences' KV heads."""
        need = num_seqs * self.spec.num_kv_heads
        for counters in self._merge_counters:
            if counters.device == device and counters.numel() >= need:
                return counters
        # Splitting stops at ``waves`` programs per SM, so this many usually suffice.
        size = max(need, self.waves * _num_sms(device))
        counters = torch.zeros(size, dtype=torch.int32, device=device)
        self._merge_counters.append(counters)
        return counters

    def prepare(self, metadata: AttentionMetadata) -> None:
        device = metadata.seq_lens.device
        plan = self.plan(metadata, device)
        metadata.extra[EXTRA_KEY] = plan
        if plan.num_splits > 1 and plan.merge_in_decode:
            self.merge_counters(metadata.num_seqs, device)  # allocated before any capture

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
        write_kv(
            _contiguous_last(key),
            _contiguous_last(value),
            k_cache,
            v_cache,
            metadata.slot_mapping,
            k_scale=k_scale,
            v_scale=v_scale,
        )

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
        query = _contiguous_last(query)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0 or metadata.num_seqs == 0:
            return out
        plan = metadata.extra.get(EXTRA_KEY)
        if plan is None:
            plan = self.plan(metadata, query.device)
        args = (
            out,
            query,
            k_cache,
            v_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
        )
        fp8 = {"k_scale": k_scale, "v_scale": v_scale, "fp8_native": self.fp8_native}
        if plan.decode:
            decode_attention(
                *args,
                plan.num_splits,
                scale,
                sliding_window or None,
                logits_soft_cap or None,
                tile_n=plan.decode_tile_n or None,
                num_warps=plan.decode_num_warps,
                merge_counters=(
                    self.merge_counters(metadata.num_seqs, query.device)
                    if plan.merge_in_decode
                    else None
                ),
                **fp8,
            )
        else:
            prefill_attention(
                *args,
                metadata.max_query_len,
                scale,
                sliding_window or None,
                logits_soft_cap or None,
                **fp8,
            )
        return out
