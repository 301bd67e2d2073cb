"""Device helpers shared by the prefill and decode kernels.

Scores are kept in log2 units (pre-multiplied by log2(e)) so the softmax uses ``exp2``,
which maps to a single hardware instruction; the running max ``m`` is in the same units,
and the decode partials store it that way for the reduce kernel.
"""

from __future__ import annotations

import functools

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


# KV cache formats, the kernels' KV_FP8 constexpr: the run dtype, or fp8 bytes (the cache
# is handed over as uint8) with the per-layer scale of the shared definition
# (tessellm.interfaces.attention).
KV_SAME = 0
KV_E4M3 = 1
KV_E5M2 = 2


def kv_format(dtype: torch.dtype) -> int:
    return {torch.float8_e4m3fn: KV_E4M3, torch.float8_e5m2: KV_E5M2}.get(dtype, KV_SAME)


def native_e4m3(device: torch.device) -> bool:
    """Whether Triton converts e4m3 in hardware here (``fp8e4nv``: NVIDIA from compute
    capability 8.9, and the interpreter); elsewhere the kernels decode the bits."""
    if device.type == "cuda" and torch.version.hip is None:
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"  # the interpreter


@functools.cache
def unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


def kv_cache_args(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    native: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """``(k_cache, v_cache, k_scale, v_scale, KV_FP8, FP8_NATIVE)`` as the attention
    kernels take them: an fp8 cache as its bytes, missing scales as 1.0 (allocated once
    per device: the model's layers always pass theirs); ``native``: None decides by the
    device."""
    fmt = kv_format(k_cache.dtype)
    if fmt == KV_SAME:  # the cache stands in for the scale pointers, never read
        return k_cache, v_cache, k_cache, k_cache, KV_SAME, False
    unit = unit_scale(k_cache.device)
    if native is None:
        native = native_e4m3(k_cache.device)
    return (
        k_cache.view(torch.uint8),
        v_cache.view(torch.uint8),
        unit if k_scale is None else k_scale,
        unit if v_scale is None else v_scale,
        fmt,
        native,
    )


@triton.jit
def fp8_to_half(x, KV_FP8: tl.constexpr, NATIVE: tl.constexpr):
    """fp8 cache bytes (uint8) as fp16, which holds every e4m3 and e5m2 value exactly."""
    if KV_FP8 == 2:
        # e5m2 is the high byte of an fp16.
        return (x.to(tl.uint16) << 8).to(tl.float16, bitcast=True)
    elif NATIVE:
        return x.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        # e4m3's exponent and mantissa bits, placed in an fp16's, read as the value times
        # 2**-8 (exponent bias 7 vs 15), subnormals included; NaN (0x7f) is not kept.
        x16 = x.to(tl.uint16)
        bits = ((x16 & 0x7F) << 7) | ((x16 & 0x80) << 8)
        return bits.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def float_to_fp8_bits(x, MANT: tl.constexpr, BIAS: tl.constexpr, MAX: tl.constexpr):
    """fp32 ``x`` clamped to +-``MAX`` and rounded to nearest-even fp8 (``MANT`` mantissa
    bits, exponent bias ``BIAS``: e4m3fn 3/7/448, e5m2 2/15/57344), as its bits (uint8).

    Integer arithmetic rather than Triton's conversions: those exist for e4m3 only on
    NVIDIA from compute capability 8.9, and the interpreter's carries a rounding into the
    exponent wrongly (e.g. 127.5 becomes 64); this matches torch's casts bit for bit."""
    x = tl.minimum(tl.maximum(x, -MAX), MAX)
    sign = (x.to(tl.uint32, bitcast=True) >> 24) & 0x80
    a = tl.abs(x)
    # Normal values: round the fp32 mantissa to MANT bits (a carry bumps the exponent),
    # then move the exponent from fp32's bias to BIAS.
    bits = a.to(tl.int32, bitcast=True)
    SHIFT: tl.constexpr = 23 - MANT
    rounded = bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)
    normal = (rounded >> SHIFT) - ((127 - BIAS) << MANT)
    # Subnormals: multiples of 2**(1 - BIAS - MANT), rounded by adding and removing 2**23
    # (whose fp32 step is 1); rounding up to the smallest normal gives its code too.
    MIN_NORMAL: tl.constexpr = 2.0 ** (1 - BIAS)
    STEPS: tl.constexpr = 2.0 ** (BIAS - 1 + MANT)
    sub = ((tl.minimum(a, MIN_NORMAL) * STEPS + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < MIN_NORMAL, sub, normal)
    return (code.to(tl.uint32) | sign).to(tl.uint8)


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
    k_scale_ptr,
    v_scale_ptr,
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
    """Online-softmax accumulation of rows ``q`` over key positions ``[k_lo, k_hi)``.

    ``q`` is ``[BLOCK_M, HEAD_P]`` (padding columns are zero), ``pos`` the position of each
    row's query. Keys are gathered token by token through the block table, so a tile may
    straddle cache blocks and ``TILE_N`` is independent of the cache block size.

    An fp8 cache (``KV_FP8``) is converted in registers; its scales are applied outside
    the tiles' arithmetic: ``k_scale`` to the score scale, ``v_scale`` to the result
    (both are linear), so the dots see the fp8 values exactly as stored.
    """
    if KV_FP8 != 0:
        scale = scale * tl.load(k_scale_ptr)
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
        k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0)
        if KV_FP8 != 0:
            k = fp8_to_half(k, KV_FP8, FP8_NATIVE)
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
        v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0)
        if KV_FP8 != 0:
            v = fp8_to_half(v, KV_FP8, FP8_NATIVE)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    if KV_FP8 != 0:
        acc = acc * tl.load(v_scale_ptr)
    return acc, m_i, l_i
