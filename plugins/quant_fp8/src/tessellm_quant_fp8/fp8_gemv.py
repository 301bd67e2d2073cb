"""Batch-1 decode through fp8 weights: ``y = (x @ q.T) * scale + bias`` for one row, in Triton.

At one token a linear layer's time is its weight's bytes over memory bandwidth, so fp8
weights (one byte) should take half of bf16's time. ``_scaled_mm`` does not get there at
one row: it first quantizes the activation (a kernel of its own) and cuBLASLt's fp8 tiles
are built for many rows (issue 13's first H100 figures: fp8 147 tok/s against bf16's 180).
This kernel reads each weight byte once, widens it to fp32 against the unquantized
activation (weight-only at one row: no activation rounding), sums in fp32 and applies the
per-output-channel scale once at the end.

Each program owns ``BLOCK_N`` output rows and walks the input dimension in ``BLOCK_K``
steps, keeping a ``[BLOCK_N, BLOCK_K]`` fp32 partial reduced once (the structure of the
bf16 GEMV in tessellm-kernels-triton). The weight may be the ``_scaled_mm`` layout (rows
and columns zero-padded to 16): only the first ``N`` rows and ``K`` columns are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class Fp8GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


# 4096 one-byte columns per step keep 16 KB of loads in flight per program, as the bf16
# GEMV's 2048 two-byte columns do (bench/fp8_gemv.py measures the alternatives).
DEFAULT_CONFIG = Fp8GemvConfig(block_n=4, block_k=4096, num_warps=4)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows < N
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    x_ptrs = x_ptr + cols
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k + cols) < K
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def fp8_gemv(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    config: Fp8GemvConfig | None = None,
) -> torch.Tensor:
    """``(x @ q[:N, :K].T) * scale[:N] + bias`` for ``x`` of one row ``[1, K]``; ``q``
    float8_e4m3fn ``[>= N, >= K]`` (row-major), ``scale`` float32 ``[>= N]``; the output
    is ``[1, out_features]`` in ``x``'s dtype."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"fp8_gemv takes one row, got x of shape {tuple(x.shape)}")
    k = x.shape[1]
    if q.shape[1] < k or q.shape[0] < out_features or q.stride(1) != 1:
        raise ValueError(f"fp8_gemv: weight {tuple(q.shape)} does not cover [{out_features}, {k}]")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or DEFAULT_CONFIG
    # Narrow inputs take one step of their own width, not a mostly masked wide one.
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    out = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(out_features, cfg.block_n),)](
        x,
        q,
        scale,
        bias if bias is not None else out,  # never read without HAS_BIAS
        out,
        out_features,
        k,
        q.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        EVEN_N=out_features % cfg.block_n == 0,
        EVEN_K=k % block_k == 0,
        num_warps=cfg.num_warps,
    )
    return out
