"""Triton dequant-GEMM and batch-1 GEMV for 4-bit group-quantized weights (CUDA).

The weight stays packed as GPTQ stores it, ``qweight`` int32 ``[K/8, N]`` (eight
consecutive inputs per word, the first in the lowest bits), with ``scales`` (fp16 or
fp32) and ``zeros`` (uint8) ``[groups, N]``: ``w[k, n] = (q - zeros[g]) * scales[g]``,
``g = k // group_size``: inputs are in group order (act-order checkpoints are permuted
once at load, their activations at each call). The 4-bit values are unpacked, shifted
and scaled in registers; no dense weight is ever written.

- GEMM (prompts, batches): ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tiles on
  ``tl.dot`` with an fp32 accumulator; each step's ``BLOCK_K`` (32 or 64) inputs lie in
  one group (``group_size % BLOCK_K == 0``), so it loads one row of scales and zeros.
- GEMV (one row, batch-1 decode): no tensor cores to feed, the time is the weight's
  bytes; each program owns ``BLOCK_N`` outputs and reads each packed word once, taking
  its eight inputs as eight strided slices of ``x``; 128 inputs a step, with one row of
  scales and zeros where they lie in one group (groups of 128 or more). The input is
  split over programs (partial sums added after) so that narrow outputs still fill the
  GPU.

Imported lazily (triton is the package's ``[cuda]`` extra).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The batch-1 GEMV's tile (outputs x packed words per step) and the grid it aims for.
GEMV_BLOCK_N = 64
GEMV_BLOCK_WORDS = 16
GEMV_TARGET_PROGRAMS = 512


# M (the step's token count) changes every step: not specialised, so one compiled variant
# serves every count instead of one per class (1, a multiple of 16, other).
@triton.jit(do_not_specialize=["M"])
def _int4_gemm_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_ok = rows < M
    n_ok = cols < N
    shifts = (ks % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        # Each word is read by its 8 inputs' rows of the tile (from cache after the first).
        packed = tl.load(
            qw_ptr + (k[:, None] // 8).to(tl.int64) * N + cols[None, :],
            mask=k_ok[:, None] & n_ok[None, :],
            other=0,
        )
        q = (packed >> shifts[:, None]) & 0xF
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + cols, mask=n_ok, other=0.0)
        zero = tl.load(zeros_ptr + group * N + cols, mask=n_ok, other=0.0)
        w = (q.to(tl.float32) - zero.to(tl.float32)[None, :]) * scale.to(tl.float32)[None, :]
        if IEEE:  # fp32 runs: full fp32 products, not TF32
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    N,
    K,
    group_size,
    stride_split,
    WORDS_PER_SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    STEP_IN_ONE_GROUP: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.arange(0, BLOCK_WORDS)
    n_ok = cols < N
    acc = tl.zeros([BLOCK_WORDS, BLOCK_N], dtype=tl.float32)
    # This program's share of the input: WORDS_PER_SPLIT packed words (a whole number of
    # steps, so a step never straddles two splits' groups).
    first = tl.program_id(1) * WORDS_PER_SPLIT
    last = tl.minimum(first + WORDS_PER_SPLIT, tl.cdiv(K, 8))
    for w0 in range(first, last, BLOCK_WORDS):
        word = w0 + words
        word_ok = word < last
        packed = tl.load(
            qw_ptr + word[:, None].to(tl.int64) * N + cols[None, :],
            mask=word_ok[:, None] & n_ok[None, :],
            other=0,
        )
        if STEP_IN_ONE_GROUP:  # one row of scales and zeros for the step
            group = (w0 * 8) // group_size
            scale = tl.load(scales_ptr + group * N + cols, mask=n_ok, other=0.0)
            zero = tl.load(zeros_ptr + group * N + cols, mask=n_ok, other=0.0)
            scale = scale.to(tl.float32)[None, :]
            zero = zero.to(tl.float32)[None, :]
        else:  # smaller groups than a step: each word's own
            group = (word * 8) // group_size
            ptrs = group[:, None] * N + cols[None, :]
            mask = word_ok[:, None] & n_ok[None, :]
            scale = tl.load(scales_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(8):
            k = word * 8 + j
            x = tl.load(x_ptr + k, mask=word_ok & (k < K), other=0.0).to(tl.float32)
            q = ((packed >> (4 * j)) & 0xF).to(tl.float32)
            acc += x[:, None] * ((q - zero) * scale)
    y = tl.sum(acc, axis=0)
    out = out_ptr + tl.program_id(1) * stride_split + cols
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def int4_group_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W`` for ``W`` as the module docstring stores it; ``[M, N]`` in
    ``x.dtype``. ``group_size``: inputs per group, a multiple of 32 or at least ``K``."""
    rows, in_features = x.shape
    out_features = qweight.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 1:
        block_n, block_words = GEMV_BLOCK_N, GEMV_BLOCK_WORDS
        col_blocks = triton.cdiv(out_features, block_n)
        steps = triton.cdiv(triton.cdiv(in_features, 8), block_words)
        # Split the input over programs until the grid has about GEMV_TARGET_PROGRAMS
        # (an 8B model's 4096-wide outputs are only 64 column blocks: a third of an
        # H100's SMs, each walking all of K); partial sums in fp32, added by one sum.
        split = max(1, min(steps, GEMV_TARGET_PROGRAMS // col_blocks))
        words_per_split = triton.cdiv(steps, split) * block_words
        split = triton.cdiv(triton.cdiv(in_features, 8), words_per_split)
        target = out if split == 1 else torch.empty(split, out_features, device=x.device)
        _int4_gemv_kernel[(col_blocks, split)](
            x,
            qweight,
            scales,
            zeros,
            target,
            out_features,
            in_features,
            group_size,
            target.stride(0),
            words_per_split,
            BLOCK_N=block_n,
            BLOCK_WORDS=block_words,
            STEP_IN_ONE_GROUP=group_size % (8 * block_words) == 0 or group_size >= in_features,
        )
        if split > 1:
            out.copy_(target.sum(dim=0, keepdim=True))
        return out
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    block_n = 64 if out_features >= 64 else 32
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _int4_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        out,
        rows,
        out_features,
        in_features,
        group_size,
        x.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64 if group_size % 64 == 0 or group_size >= in_features else 32,
        IEEE=x.dtype == torch.float32,
    )
    return out
