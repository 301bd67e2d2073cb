"""Neox rotary of q and k with the KV-cache store, in one launch.

The attention layer otherwise rotates q and k in one kernel (``rotary.py``), then stores
k and v at their cache slots in another (the backend's ``write_kv``): two launches per
layer and a round trip of the rotated k through memory. Here one program per token loads
the position's cos/sin row, writes the rotated q to a fresh tensor, and writes the rotated
k and the unchanged v straight into the paged cache in the layout every attention backend
shares (``tessellm.interfaces.attention``: ``[num_blocks, block_size, Hkv, D]``, slot
``-1`` not stored), cast to the cache's dtype. The rotation rounds as ``rotary.py`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rotary import _rotate_heads


@triton.jit
def _rotary_write_kv_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    n_q_heads, n_k_heads,
    BLOCK_SIZE: tl.constexpr, QH_P: tl.constexpr, KH_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_P)
    cos = tl.load(cos_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)
    _rotate_heads(
        q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, token, n_q_heads,
        cos, sin, QH_P, HALF, HALF_P,
    )  # fmt: skip
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct
        # The destination is one cache row, not indexed by token: its token stride is 0.
        _rotate_heads(
            k_ptr, k_dst, stride_kt, stride_kh, 0, stride_kch, token, n_k_heads,
            cos, sin, KH_P, HALF, HALF_P,
        )  # fmt: skip
        heads = tl.arange(0, KH_P)
        full = tl.arange(0, 2 * HALF_P)
        mask = (heads[:, None] < n_k_heads) & (full[None, :] < 2 * HALF)
        v = tl.load(
            v_ptr + token * stride_vt + heads[:, None] * stride_vh + full[None, :], mask=mask
        )
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct
        tl.store(
            v_dst + heads[:, None] * stride_vch + full[None, :],
            v.to(v_cache_ptr.dtype.element_ty),
            mask=mask,
        )


def rotary_neox_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotated ``q`` ``[T, Hq, D]`` (a new tensor); rotated ``k`` and ``v`` ``[T, Hk, D]``
    stored at ``slot_mapping`` in ``k_cache``/``v_cache`` ``[blocks, block_size, Hk, D]``."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    num_tokens, n_q, head_size = q.shape
    n_k = k.shape[1]
    half = head_size // 2
    q_out = torch.empty((num_tokens, n_q, head_size), dtype=q.dtype, device=q.device)
    if num_tokens:
        heads_p = triton.next_power_of_2(max(n_q, n_k))
        _rotary_write_kv_kernel[(num_tokens,)](
            positions, q, k, v, q_out, k_cache, v_cache, slot_mapping, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            n_q, n_k,
            BLOCK_SIZE=k_cache.shape[1],
            QH_P=triton.next_power_of_2(n_q),
            KH_P=triton.next_power_of_2(n_k),
            HALF=half,
            HALF_P=triton.next_power_of_2(half),
            num_warps=4 if heads_p * half <= 2048 else 8,
        )  # fmt: skip
    return q_out
