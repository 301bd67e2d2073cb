"""CUDA: ``y = x W^T`` straight from GGUF codes, ``W = code * scale + zero`` per group.

The codes stay as loaded (two per byte for 4-bit types, one byte otherwise) with fp32
scales and zeros per group of 32 inputs (16 for Q6_K); the kernels dequantize each tile
in registers and never write a dense weight. Few rows (decode) take a GEMV kernel that
keeps an fp32 ``[BLOCK_N, BLOCK_K]`` partial per program and reduces it once; more rows
take a tiled kernel with ``tl.dot`` (fp32 inputs at full precision, ``input_precision
="ieee"``; bf16/fp16 tiles on the tensor cores, accumulated in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from tessellm_gguf.blocks import GroupedCodes
from tessellm_gguf.runtime import pack_nibbles

# Up to this many rows use the GEMV kernel (one program per row and block of outputs).
GEMV_MAX_ROWS = 4


@triton.jit
def _load_weight_tile(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    rows,
    cols,
    mask,
    stride_c,
    stride_s,
    GROUP: tl.constexpr,
    NIBBLES: tl.constexpr,
):
    """fp32 weights ``[len(rows), len(cols)]`` dequantized from the codes."""
    if NIBBLES:
        byte = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :] // 2, mask=mask)
        code = (byte >> ((cols[None, :] % 2) * 4).to(tl.uint8)) & 0x0F
    else:
        code = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask)
    group_at = rows[:, None] * stride_s + cols[None, :] // GROUP
    scale = tl.load(scale_ptr + group_at, mask=mask, other=0.0)
    zero = tl.load(zero_ptr + group_at, mask=mask, other=0.0)
    return code.to(tl.float32) * scale + zero


@triton.jit
def _gguf_gemv_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_om,
    stride_c,
    stride_s,
    GROUP: tl.constexpr,
    NIBBLES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    rows_safe = tl.where(n_ok, rows, 0).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x = tl.load(x_ptr + row * stride_xm + cols, mask=k_ok, other=0.0).to(tl.float32)
        mask = n_ok[:, None] & k_ok[None, :]
        w = _load_weight_tile(
            codes_ptr, scale_ptr, zero_ptr, rows_safe, cols, mask, stride_c, stride_s,
            GROUP, NIBBLES,
        )  # fmt: skip
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(out_ptr + row * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=n_ok)


# M (the step's token count) changes every step: not specialised (see tessellm_quant_int4).
@triton.jit(do_not_specialize=["M"])
def _gguf_mm_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_c,
    stride_s,
    GROUP: tl.constexpr,
    NIBBLES: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = ms < M, rows < N
    rows_safe = tl.where(n_ok, rows, 0).to(tl.int64)
    ms_safe = tl.where(m_ok, ms, 0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x = tl.load(
            x_ptr + ms_safe[:, None] * stride_xm + cols[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = _load_weight_tile(
            codes_ptr, scale_ptr, zero_ptr, rows_safe, cols, n_ok[:, None] & k_ok[None, :],
            stride_c, stride_s, GROUP, NIBBLES,
        )  # fmt: skip
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = out_ptr + ms_safe[:, None] * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gguf_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    nibbles: bool,
) -> torch.Tensor:
    """``x [M, K] @ W.T`` for ``W [N, K] = code * scale + zero`` (``codes`` ``[N, K/2]``
    two per byte with ``nibbles``, else ``[N, K]``; ``scale``/``zero`` ``[N, K/group]``
    fp32), in ``x``'s dtype."""
    m, k = x.shape
    n = codes.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    strides = (x.stride(0), out.stride(0), codes.stride(0), scale.stride(0))
    if m <= GEMV_MAX_ROWS:
        block_n, block_k = 16, min(256, triton.next_power_of_2(k))
        _gguf_gemv_kernel[(triton.cdiv(n, block_n), m)](
            x, codes, scale, zero, out, n, k, *strides,
            GROUP=group, NIBBLES=nibbles, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
        return out
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n, block_k = 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gguf_mm_kernel[grid](
        x, codes, scale, zero, out, m, n, k, *strides,
        GROUP=group, NIBBLES=nibbles, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


class TritonSegment(nn.Module):
    def __init__(self, g: GroupedCodes) -> None:
        super().__init__()
        self.out_features, self.in_features = g.codes.shape
        self.group, self.nibbles = g.group, g.bits <= 4
        codes = pack_nibbles(g.codes) if self.nibbles else g.codes
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", g.scale.float().contiguous())
        self.register_buffer("zero", g.zero.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = gguf_matmul(rows, self.codes, self.scale, self.zero, self.group, self.nibbles)
        return out.view(*x.shape[:-1], self.out_features)
