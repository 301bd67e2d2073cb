"""Unified kernel: any mix of prefill, chunked prefill and decode rows in one launch.

A program owns ``BLOCK_Q`` consecutive query tokens of one sequence times the ``GROUP``
query heads that share one KV head, so every K/V tile it loads serves the whole group.
The grid is flat over query tiles (``T // BLOCK_Q + num_seqs`` is an upper bound on the
tiles of all sequences); each program finds its sequence by binary search over
``query_start_loc``, which keeps the launch free of host-side per-sequence values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import attend_keys, kv_cache_args, next_pow2, precision_for, tile_shape


@triton.jit
def _find_seq(qsl_ptr, tile_id, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence s owns flat tiles [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1);
    # that start is strictly increasing in s, so the last start <= tile_id is ours.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The batch's sequence count and block-table width change from step to step; specialised
# (==1, a multiple of 16, other) each class would compile its own variant while serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    num_seqs,
    scale,
    soft_cap,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_P: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(qsl_ptr, tile_id, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    local = tile_id - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = local * BLOCK_Q + rows // GROUP_P
    member = rows % GROUP_P
    row_ok = (rows < BLOCK_Q * GROUP_P) & (member < GROUP) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    head = kv_head * GROUP + member
    pos = context + q_idx
    offs_d = tl.arange(0, HEAD_P)
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_SIZE)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )

    # Keys any row of this tile can see: up to its last query, back to the window of its first.
    k_hi = tl.minimum(seq_len, context + (local + 1) * BLOCK_Q)
    k_lo = 0
    if USE_WINDOW:
        k_lo = tl.maximum(context + local * BLOCK_Q - window + 1, 0)

    acc = tl.zeros([BLOCK_M, HEAD_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_keys(
        acc,
        m_i,
        l_i,
        q,
        pos,
        row_ok,
        k_lo,
        k_hi,
        block_tables_ptr + seq.to(tl.int64) * stride_bt,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        scale,
        soft_cap,
        window,
        k_scale_ptr,
        v_scale_ptr,
        BLOCK_SIZE,
        HEAD_SIZE,
        HEAD_P,
        TILE_N,
        USE_WINDOW,
        USE_CAP,
        PRECISION,
        KV_FP8,
        FP8_NATIVE,
    )
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


def prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fp8_native: bool | None = None,
) -> None:
    """Fill ``out`` ``[T, H, D]`` for every query row of the packed batch.

    ``k_scale``/``v_scale``/``fp8_native``: an fp8 cache's (``common.kv_cache_args``)."""
    k_cache, v_cache, k_scale, v_scale, kv_fp8, fp8_native = kv_cache_args(
        k_cache, v_cache, k_scale, v_scale, fp8_native
    )
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    group_p = next_pow2(group)
    head_p = next_pow2(max(head_size, 16))
    # Many rows per tile amortise each K/V load; wide rows get fewer to bound registers.
    rows_target, tile_n = tile_shape(head_p, query.dtype)
    block_q = max(1, rows_target // group_p)
    # Short queries (e.g. mostly-decode batches) should not pay for idle rows.
    block_q = min(block_q, next_pow2(max(max_query_len, 1)))
    block_m = max(16, block_q * group_p)  # tl.dot needs at least 16 rows
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        out,
        query,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        seq_lens,
        query_start_loc,
        num_seqs,
        scale,
        logits_soft_cap or 0.0,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_P=group_p,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_SIZE=head_size,
        HEAD_P=head_p,
        TILE_N=tile_n,
        USE_WINDOW=bool(sliding_window),
        USE_CAP=bool(logits_soft_cap),
        PRECISION=precision_for(query.dtype),
        KV_FP8=kv_fp8,
        FP8_NATIVE=fp8_native,
        num_warps=4,
    )
