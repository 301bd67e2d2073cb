"""Decode (one query token per sequence) with the context split along the keys.

A decode batch has too few query rows to fill a GPU with one program per (sequence, KV
head) when contexts are long, so the context is cut into ``num_splits`` ranges processed
by separate programs (flash-decoding). Each writes an unnormalised fp32 partial with its
running max and sum, and the partials are merged either by a second kernel or, given
merge counters, by whichever split of a (sequence, KV head) finishes last: each split
counts itself in on the pair's counter once its partial is stored, and the one that
completes the count merges and sets the counter back to zero for the next launch (one
launch fewer per layer; at batch 1 the merge is a few microseconds of latency).
``num_splits`` is fixed per launch but
every sequence divides *its own* context into that many ranges, so the result is right
for any sequence length, including ones longer than the ``max_seq_len`` the split count
was planned for (a CUDA graph replayed with longer contexts stays correct).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import attend_keys, kv_cache_args, next_pow2, precision_for, tile_shape


# An eager step's block-table width and split count change with its sequences (see
# _prefill_kernel).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    counter_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    num_heads,
    num_splits,
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
    SPLIT: tl.constexpr,
    MERGE: tl.constexpr,
    SPLITS_P: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    # Sequences without a query token this step (padding) get no live rows. (Written as one
    # comparison: the interpreter mishandles ``tensor & scalar_bool``.)
    row_ok = rows < GROUP * tl.minimum(q_len, 1)
    head = kv_head * GROUP + rows
    pos = tl.zeros([BLOCK_M], dtype=tl.int32) + (seq_len - 1)
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_SIZE
    token = q_start.to(tl.int64)
    q = tl.load(
        q_ptr + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    if SPLIT:
        base = (lo // TILE_N) * TILE_N
        per_split = tl.cdiv(tl.cdiv(seq_len - base, num_splits), TILE_N) * TILE_N
        k_lo = tl.maximum(base + split * per_split, lo)
        k_hi = tl.minimum(base + (split + 1) * per_split, seq_len)
    else:
        k_lo = lo
        k_hi = seq_len

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
    if SPLIT:
        part = (seq.to(tl.int64) * num_splits + split) * num_heads + head
        keep = rows < GROUP
        tl.store(part_m_ptr + part, m_i, mask=keep)
        tl.store(part_l_ptr + part, l_i, mask=keep)
        tl.store(part_acc_ptr + part[:, None] * HEAD_P + offs_d[None, :], acc, mask=keep[:, None])
        if MERGE:
            # Every thread's partial is stored before the count is released (the barrier),
            # and the last split reads the others' partials after acquiring it.
            tl.debug_barrier()
            counter = counter_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed")
                _merge_rows(
                    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, seq, head, row_ok, keep,
                    token, num_heads, num_splits, stride_ot, stride_oh,
                    BLOCK_M, SPLITS_P, HEAD_SIZE, HEAD_P,
                )  # fmt: skip
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _merge_rows(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, seq, head, row_ok, keep, token,
    num_heads, num_splits, stride_ot, stride_oh,
    BLOCK_M: tl.constexpr, SPLITS_P: tl.constexpr, HEAD_SIZE: tl.constexpr,
    HEAD_P: tl.constexpr,
):  # fmt: skip
    """The reduce kernel's arithmetic for the query heads ``head`` of one KV head."""
    splits = tl.arange(0, SPLITS_P)
    part = (seq.to(tl.int64) * num_splits + splits[:, None]) * num_heads + head[None, :]
    ok = (splits[:, None] < num_splits) & keep[None, :]
    # Other programs wrote these: read them from L2, past this SM's L1.
    m = tl.load(part_m_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(part_l_ptr + part, mask=ok, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max[None, :])  # splits that saw no key weigh exactly zero
    total = tl.sum(w * l_s, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    offs_d = tl.arange(0, HEAD_P)
    out = tl.zeros([BLOCK_M, HEAD_P], dtype=tl.float32)
    for s in range(0, num_splits):
        rows = (seq.to(tl.int64) * num_splits + s) * num_heads + head
        m_s = tl.load(part_m_ptr + rows, mask=keep, other=float("-inf"), cache_modifier=".cg")
        acc = tl.load(
            part_acc_ptr + rows[:, None] * HEAD_P + offs_d[None, :],
            mask=keep[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        out += acc * tl.math.exp2(m_s - m_max)[:, None]
    out = out / total[:, None]
    tl.store(
        out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d < HEAD_SIZE)[None, :],
    )


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    qsl_ptr,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    SPLITS_P: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_P: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_start:
        return
    splits = tl.arange(0, SPLITS_P)
    s_ok = splits < num_splits
    part = (seq.to(tl.int64) * num_splits + splits) * num_heads + head
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    # Splits that saw no key have m = -inf and so weigh exactly zero.
    w = tl.math.exp2(m - m_max)
    total = tl.sum(w * l_s, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    offs_d = tl.arange(0, HEAD_P)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_P + offs_d[None, :], mask=s_ok[:, None], other=0.0
    )
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(
        out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_SIZE,
    )


def decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_splits: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    *,
    tile_n: int | None = None,
    num_warps: int = 4,
    merge_counters: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    fp8_native: bool | None = None,
) -> None:
    """Fill ``out`` for a batch whose sequences have at most one query token each.

    ``tile_n`` keys per tile (a power of two, at least 16; None: by head size).
    ``merge_counters``: zeroed int32, at least ``num_seqs * num_kv_heads``, left zeroed;
    given, the last split of each (sequence, KV head) merges instead of a second kernel.
    ``k_scale``/``v_scale``/``fp8_native``: an fp8 cache's (``common.kv_cache_args``)."""
    k_cache, v_cache, k_scale, v_scale, kv_fp8, fp8_native = kv_cache_args(
        k_cache, v_cache, k_scale, v_scale, fp8_native
    )
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    head_p = next_pow2(max(head_size, 16))
    split = num_splits > 1
    if split:
        # Fresh buffers each call: the caching allocator makes this cheap and sync-free,
        # and under CUDA-graph capture they come from the graph's private pool.
        part_acc = torch.empty(
            (num_seqs, num_splits, num_heads, head_p), dtype=torch.float32, device=query.device
        )
        part_m = torch.empty(
            (num_seqs, num_splits, num_heads), dtype=torch.float32, device=query.device
        )
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # never touched when SPLIT is off
    merge = split and merge_counters is not None
    if merge and merge_counters.numel() < num_seqs * num_kv_heads:
        raise ValueError(f"{merge_counters.numel()} merge counters for {num_seqs} sequences")
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out,
        part_acc,
        part_m,
        part_l,
        merge_counters if merge else seq_lens,  # never touched without MERGE
        query,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        seq_lens,
        query_start_loc,
        num_heads,
        num_splits,
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
        BLOCK_M=max(16, next_pow2(group)),  # tl.dot needs at least 16 rows
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_SIZE=head_size,
        HEAD_P=head_p,
        TILE_N=tile_n or tile_shape(head_p, query.dtype)[1],
        USE_WINDOW=bool(sliding_window),
        USE_CAP=bool(logits_soft_cap),
        PRECISION=precision_for(query.dtype),
        KV_FP8=kv_fp8,
        FP8_NATIVE=fp8_native,
        SPLIT=split,
        MERGE=merge,
        SPLITS_P=next_pow2(num_splits),
        num_warps=num_warps,
    )
    if split and not merge:
        _reduce_kernel[(num_seqs, num_heads)](
            out,
            part_acc,
            part_m,
            part_l,
            query_start_loc,
            num_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            SPLITS_P=next_pow2(num_splits),
            HEAD_SIZE=head_size,
            HEAD_P=head_p,
            num_warps=4,
        )
