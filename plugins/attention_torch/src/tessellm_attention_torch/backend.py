"""Paged attention written with torch operations only; runs on any torch device.

It favours clarity: per sequence it gathers the context's K/V from the block table and
computes masked attention in fp32. Faster backends are checked against this one.

An fp8 cache (``kv_cache_dtype``) is written as ``k / k_scale`` clamped to the format's
range and read back as ``k_fp8 * k_scale`` in fp32 (the shared definition,
``tessellm.interfaces.attention``).
"""

from __future__ import annotations

import torch

from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
    fp8_max,
    is_fp8,
)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` stores it: fp8 holds ``x / scale``, clamped (the cast
    itself does not saturate: out-of-range values would become NaN)."""
    if not is_fp8(dtype):
        return x.to(dtype)
    limit = fp8_max(dtype)
    scaled = x.float() if scale is None else x.float() / scale
    return scaled.clamp(-limit, limit).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached keys or values in fp32: fp8 entries times their layer's scale."""
    out = x.float()
    return out * scale if is_fp8(x.dtype) and scale is not None else out


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[seq_len, Hkv, D]`` of one sequence's cached keys or values."""
    if is_fp8(cache.dtype):  # gathered as bytes: fp8 has no index kernels on every device
        return gather_context(cache.view(torch.uint8), block_table, seq_len).view(cache.dtype)
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Causal attention of ``q`` ``[Tq, H, D]`` over ``k``/``v`` ``[Tk, Hkv, D]`` (fp32)."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    qf = q.float().view(q.shape[0], num_kv_heads, group, q.shape[2])
    scores = torch.einsum("qhgd,khd->hgqk", qf, k.float()) * scale
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    k_positions = torch.arange(k.shape[0], device=q.device)
    allowed = k_positions[None, :] <= q_positions[:, None]
    if sliding_window:
        allowed &= (q_positions[:, None] - k_positions[None, :]) < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())
    return out.reshape(q.shape).to(q.dtype)


class TorchPagedAttention(AttentionBackend):
    name = "torch"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"*"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        kv_cache_dtypes=frozenset({"auto", "fp8_e4m3", "fp8_e5m2"}),
    )

    def write_kv(
        self,
        key,
        value,
        k_cache,
        v_cache,
        metadata: AttentionMetadata,
        *,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        slots = metadata.slot_mapping
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        key = quantize_kv(key, k_scale, k_cache.dtype)
        value = quantize_kv(value, v_scale, v_cache.dtype)
        # index_copy_ has no fp8 kernels: the bytes are copied instead.
        for cache, rows in ((k_cache, key), (v_cache, value)):
            if is_fp8(cache.dtype):
                cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, rows)

    def forward(
        self,
        query,
        k_cache,
        v_cache,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        for i, seq_len in enumerate(seq_lens):
            lo, hi = starts[i], starts[i + 1]
            if hi == lo:
                continue
            table = metadata.block_tables[i]
            k = dequantize_kv(gather_context(k_cache, table, seq_len), k_scale)
            v = dequantize_kv(gather_context(v_cache, table, seq_len), v_scale)
            q_positions = torch.arange(seq_len - (hi - lo), seq_len, device=query.device)
            out[lo:hi] = attend(
                query[lo:hi], k, v, q_positions, scale, sliding_window, logits_soft_cap
            )
        return out
