"""Scatter this step's keys and values into the paged cache at their slots.

An fp8 cache stores ``x / scale`` clamped to the format's range, rounded to nearest even
(the shared definition, ``tessellm.interfaces.attention``), converted in registers on any
device (``common.float_to_fp8_bits``) and stored as bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import KV_SAME, float_to_fp8_bits, kv_format, next_pow2, unit_scale


@triton.jit
def _quantize(x, scale_ptr, KV_FP8: tl.constexpr):
    x = x.to(tl.float32) / tl.load(scale_ptr)
    if KV_FP8 == 1:
        return float_to_fp8_bits(x, 3, 7, 448.0)
    else:
        return float_to_fp8_bits(x, 2, 15, 57344.0)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_P: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token)
    # A slot of -1 marks a padding token (e.g. a CUDA-graph batch filled up to its size).
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_d = tl.arange(0, HEAD_P)
    mask = offs_d < HEAD_SIZE
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + offs_d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + offs_d, mask=mask)
    if KV_FP8 != 0:  # the caches are handed over as bytes
        k = _quantize(k, k_scale_ptr, KV_FP8)
        v = _quantize(v, v_scale_ptr, KV_FP8)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + head * stride_kch
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + head * stride_vch
    tl.store(k_dst + offs_d, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store ``key``/``value`` ``[T, Hkv, D]`` into ``[num_blocks, block_size, Hkv, D]``;
    into an fp8 cache as ``key / k_scale`` and ``value / v_scale`` (scales: 1.0 if None)."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    fmt = kv_format(k_cache.dtype)
    if fmt == KV_SAME:  # the key stands in for the scale pointers, never read
        k_scale = v_scale = key
    else:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        k_scale = unit_scale(key.device) if k_scale is None else k_scale
        v_scale = unit_scale(key.device) if v_scale is None else v_scale
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_SIZE=head_size,
        HEAD_P=next_pow2(head_size),
        KV_FP8=fmt,
        num_warps=1,
    )
