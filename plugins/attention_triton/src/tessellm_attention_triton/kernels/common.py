"""Device helpers shared by the prefill and decode kernels.

Scores are kept in log2 units (pre-multiplied by log2(e)) so the softmax uses ``exp2``,
which maps to a single hardware instruction; the running max ``m`` is in the same units,
and the decode partials store it that way for the reduce kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile_shape(head_p: int, dtype: torch.dtype) -> tuple[int, int]:
    """(query rows, keys) per tile, sized by the bytes of one K/V row.

    Wide rows (fp32, or 256-wide heads) get smaller tiles so the staged K/V tiles stay
    within the 64 KiB of shared memory of MI300 and of consumer NVIDIA parts.
    """
    row_bytes = head_p * dtype.itemsize
    if row_bytes <= 256:
        return 64, 64
    if row_bytes <= 512:
        return 32, 32
    return 32, 16


def precision_for(dtype: torch.dtype) -> str | None:
    """fp32 models get exact fp32 dots (tf32 would lose ~3 digits); others the default."""
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _tanh(x):
    # tl.math.tanh is not in every Triton release nor in the interpreter; this form
    # saturates correctly to +-1 because exp overflows to inf / underflows to 0.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def attend_keys(
    acc,
    m_i,
    l_i,
    q,
    pos,
    row_ok,
    k_lo,
    k_hi,
    bt_row_ptr,
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
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_P: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax accumulation of rows ``q`` over key positions ``[k_lo, k_hi)``.

    ``q`` is ``[BLOCK_M, HEAD_P]`` (padding columns are zero), ``pos`` the position of each
    row's query. Keys are gathered token by token through the block table, so a tile may
    straddle cache blocks and ``TILE_N`` is independent of the cache block size.
    """
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_P)
    d_ok = offs_d < HEAD_SIZE
    # Tiles start on a TILE_N boundary so consecutive tiles cover whole cache blocks.
    start = (k_lo // TILE_N) * TILE_N
    for tile in range(start, k_hi, TILE_N):
        kpos = tile + offs_n
        k_ok = (kpos >= k_lo) & (kpos < k_hi)
        block = tl.load(bt_row_ptr + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        offset = kpos % BLOCK_SIZE
        k_ptrs = (
            k_cache_ptr
            + block[None, :] * stride_kb
            + offset[None, :] * stride_kt
            + kv_head * stride_kh
            + offs_d[:, None]
        )
        k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * scale
        if USE_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        allowed = row_ok[:, None] & k_ok[None, :] & (kpos[None, :] <= pos[:, None])
        if USE_WINDOW:
            allowed = allowed & ((pos[:, None] - kpos[None, :]) < window)
        s = tl.where(allowed, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with no visible key yet keep m = -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = (
            v_cache_ptr
            + block[:, None] * stride_vb
            + offset[:, None] * stride_vt
            + kv_head * stride_vh
            + offs_d[None, :]
        )
        v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i
