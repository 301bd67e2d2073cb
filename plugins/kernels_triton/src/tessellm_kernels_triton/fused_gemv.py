"""The one-row GEMV with its neighbours' row-wise work folded in (batch-1 decode).

At one token, RMSNorm and SiLU-and-mul are tiny kernels (about 2 µs each on an H200, plus
the gap before the next launch) between GEMVs that stream megabytes of weights. Here they
become part of the GEMV:

- RMSNorm on the input: ``W (g * s / rms(s)) = (W (g * s)) / rms(s)``, so every program
  multiplies by ``g * s`` and accumulates ``sum(s * s)`` in the same pass over the input,
  scaling its rows by ``rsqrt(mean + eps)`` at the end. Each program repeats the
  statistic over the whole row, which is nothing next to its share of the weight. The
  residual add ``s = x + residual`` is done on load and rounded to the model dtype
  exactly as torch does, and program 0 writes ``s`` out as the new residual stream. The
  normed input itself is never rounded to the model dtype (the torch code rounds it
  twice), so results differ from norm-then-GEMV in the last bit of some outputs.
- SiLU-and-mul on the output: a program owns the same rows of the gate and the up half
  of ``[gate | up]`` and writes ``silu(gate) * up``, rounding as the separate kernel does.

Weights are the dense ``[N, K]`` matrices of ``unquantized_gemv``; the layout of the loop
is that of ``gemv._gemv_kernel`` (fp32 ``[BLOCK_N, BLOCK_K]`` partials reduced once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import DEFAULT_CONFIG, GemvConfig

# The SiLU form keeps two partial tiles (gate and up rows), so it takes half the columns
# per step to stay within registers.
DEFAULT_SILU_CONFIG = GemvConfig(block_n=4, block_k=1024, num_warps=4)


@triton.jit
def _fused_gemv_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,
    norm_w_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    eps,
    norm_offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    SILU_MUL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows < N
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # Only what a variant uses is defined, so no unused tile is carried through the loop.
    if SILU_MUL:
        u_ptrs = w_ptrs + N * stride_wn  # the up rows sit N rows below the gate rows
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if HAS_NORM:
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs = k + cols
        if EVEN_K:
            x = tl.load(x_ptr + offs)
        else:
            x = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
        if HAS_RESIDUAL:
            if EVEN_K:
                r = tl.load(res_ptr + offs)
            else:
                r = tl.load(res_ptr + offs, mask=offs < K, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if pid == 0:
                tl.store(res_out_ptr + offs, x, mask=offs < K)
        xf = x.to(tl.float32)
        if HAS_NORM:
            sum_sq += xf * xf
            if EVEN_K:
                g = tl.load(norm_w_ptr + offs).to(tl.float32)
            else:
                g = tl.load(norm_w_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                g = g + norm_offset
            xf = xf * g
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xf[None, :]
        if SILU_MUL:
            if EVEN_K and EVEN_N:
                u = tl.load(u_ptrs)
            elif EVEN_K:
                u = tl.load(u_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                u = tl.load(u_ptrs, mask=n_ok[:, None] & (offs < K)[None, :], other=0.0)
            acc_up += u.to(tl.float32) * xf[None, :]
            u_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_NORM:
        inv_rms = tl.math.rsqrt(tl.sum(sum_sq, axis=0) / K + eps)
        y = y * inv_rms
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    if SILU_MUL:
        up = tl.sum(acc_up, axis=1)
        if HAS_NORM:
            up = up * inv_rms
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + rows, mask=n_ok, other=0.0).to(tl.float32)
        # The roundings of GEMV output, SiLU and product, as the unfused kernels round.
        gate = y.to(ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
        y = act * up.to(ty).to(tl.float32)
    tl.store(out_ptr + rows, y.to(ty), mask=n_ok)


def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm_offset: float = 0.0,
    silu_and_mul: bool = False,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, s)`` for one row ``x`` ``[1, K]`` and ``weight`` ``[N, K]``, where
    ``s = x + residual`` (``x`` without a residual), ``h = rms_norm(s) * (offset +
    norm_weight)`` (``s`` without a norm weight), ``y = h @ weight.T + bias``, and ``out``
    is ``y`` or, with ``silu_and_mul``, ``silu(y[:, :N/2]) * y[:, N/2:]``."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"fused_gemv takes one row, got x of shape {tuple(x.shape)}")
    n, k = weight.shape
    if silu_and_mul and n % 2:
        raise ValueError(f"silu_and_mul needs an even number of rows, got {n}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    res_out = x
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        res_out = torch.empty_like(x)
    out_rows = n // 2 if silu_and_mul else n
    cfg = config or (DEFAULT_SILU_CONFIG if silu_and_mul else DEFAULT_CONFIG)
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    out = torch.empty((1, out_rows), dtype=x.dtype, device=x.device)
    _fused_gemv_kernel[(triton.cdiv(out_rows, cfg.block_n),)](
        x,
        residual if residual is not None else x,  # never read without HAS_RESIDUAL
        res_out,
        norm_weight if norm_weight is not None else x,  # never read without HAS_NORM
        weight,
        bias if bias is not None else out,  # never read without HAS_BIAS
        out,
        out_rows,
        k,
        weight.stride(0),
        eps,
        norm_offset,
        HAS_RESIDUAL=residual is not None,
        HAS_NORM=norm_weight is not None,
        HAS_OFFSET=bool(norm_offset),
        SILU_MUL=silu_and_mul,
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        EVEN_N=out_rows % cfg.block_n == 0,
        EVEN_K=k % block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, res_out
