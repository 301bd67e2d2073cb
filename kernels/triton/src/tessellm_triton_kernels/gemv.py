"""One-row matrix-vector product ``y = x W^T + b`` (batch-1 decode) in Triton.

At one token a linear layer reads its whole weight for two FLOPs per element, so its time
is the weight's bytes over memory bandwidth. cuBLAS reaches that for wide layers but not
for the small ones of an 8B model (on an H200: o_proj 4096x4096 at 59-63% of copy
bandwidth, qkv 6144x4096 at 75-78%, o_proj with a split-K pass and a separate reduce
kernel); this kernel reached 78% and 84-85% there (bench/RESULTS.md, "G2 levers").

Each program here owns ``BLOCK_N`` output rows and walks the whole input dimension in
``BLOCK_K`` steps, keeping a ``[BLOCK_N, BLOCK_K]`` fp32 partial and reducing it once at
the end: every weight byte is read once with wide, coalesced loads, there is no second
kernel, and with ``N / BLOCK_N`` programs (hundreds for these shapes) every SM has
several in flight. Products and sums are in fp32 and rounded once, as cuBLAS does; only
the order of the sum differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1


# Best or within 2% of the best of 12 tile shapes on each Llama-3-8B projection, on an
# H200 (bench/g2_levers.py gemv; bench/results/h200-2026-11-26-g2/): 4 rows per program
# gives N/4 programs (1024 for a 4096-wide output, several per SM), and 2048 columns per
# step keeps 16 KB of loads in flight per program.
DEFAULT_CONFIG = GemvConfig(block_n=4, block_k=2048, num_warps=4)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    HAS_SCALE: tl.constexpr,
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
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:  # per output row, after the sum (an fp8 weight's channel scale)
        y *= tl.load(scale_ptr + rows, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    *,
    scale: torch.Tensor | None = None,
    out_features: int | None = None,
) -> torch.Tensor:
    """``(x @ weight.T) * scale + bias`` for ``x`` of one row (``[1, K]``), ``weight``
    ``[N, K]`` of any dtype Triton widens to fp32 (bf16, fp16, fp32, float8_e4m3fn), an
    optional float32 ``scale`` per output row. A padded weight (``[>= N, >= K]``, as
    ``_scaled_mm`` wants fp8 weights) is read in its first ``out_features`` rows and ``K``
    columns."""
    if x.shape[0] != 1 or x.dim() != 2:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    n = weight.shape[0] if out_features is None else out_features
    k = x.shape[1]
    if weight.shape[0] < n or weight.shape[1] < k:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} does not cover [{n}, {k}]")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or DEFAULT_CONFIG
    # Narrow inputs (small models) take one step of their own width, not a mostly
    # masked 2048-wide one.
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        weight,
        scale if scale is not None else out,  # never read without HAS_SCALE
        bias if bias is not None else out,  # never read without HAS_BIAS
        out,
        n,
        k,
        weight.stride(0),
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        EVEN_N=n % cfg.block_n == 0,
        EVEN_K=k % block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
