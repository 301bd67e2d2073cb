"""Neox-style rotary embedding of q and k in one launch.

One program per token rotates every query and key head of that token: it loads the
position's cos/sin row once (fp32, as ``RotaryEmbedding`` keeps them) and writes q and k
to fresh contiguous tensors, where torch needs about fourteen small kernels (gathers,
casts, halves, products and concatenations). The rotation is computed in fp32 and rounded
once; the torch code rounds after each product in the model dtype, so in bf16 the two
agree to about one unit in the last place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_st,
    stride_sh,
    stride_dt,
    stride_dh,
    token,
    n_heads,
    cos,
    sin,
    HEADS_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
):
    heads = tl.arange(0, HEADS_P)
    dims = tl.arange(0, HALF_P)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < HALF)
    src = src_ptr + token * stride_st + heads[:, None] * stride_sh + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + token * stride_dt + heads[:, None] * stride_dh + dims[None, :]
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    n_q_heads, n_k_heads,
    QH_P: tl.constexpr, KH_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
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
    _rotate_heads(
        k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh, token, n_k_heads,
        cos, sin, KH_P, HALF, HALF_P,
    )  # fmt: skip


def rotary_neox(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]``; ``cos``/``sin`` are ``[P, D/2]``."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    num_tokens, n_q, head_size = q.shape
    n_k = k.shape[1]
    half = head_size // 2
    q_out = torch.empty((num_tokens, n_q, head_size), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, n_k, head_size), dtype=k.dtype, device=k.device)
    if num_tokens:
        heads_p = triton.next_power_of_2(max(n_q, n_k))
        _rotary_kernel[(num_tokens,)](
            positions,
            q,
            k,
            q_out,
            k_out,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            n_q,
            n_k,
            QH_P=triton.next_power_of_2(n_q),
            KH_P=triton.next_power_of_2(n_k),
            HALF=half,
            HALF_P=triton.next_power_of_2(half),
            num_warps=4 if heads_p * half <= 2048 else 8,
        )
    return q_out, k_out
