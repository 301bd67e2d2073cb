"""One-row GEMV with add + RMSNorm before it and SiLU-and-mul after it, as a persistent kernel.

At batch 1, RMSNorm and SiLU-and-mul are tiny kernels (about 2 µs each on an H200, plus
the gap before the next launch) between GEMVs that stream megabytes of weights. Folding
the norm into an ordinary tiled GEMV, where hundreds of programs each re-read the input,
the residual and the norm weight in every K step, made the q/k/v GEMV of Llama-3-8B
slower than the separate kernels (17-20 µs against 15.8 on an H200; bench/RESULTS.md,
"G2 fusions"). Here a fixed number of programs (a few per SM) each read those vectors
once, build the normed row in registers, rounded exactly as ``RMSNorm`` rounds it, and
then walk their share of the weight's rows, ``BLOCK_N`` whole rows at a time: the loop
reads nothing but weights, less than the plain GEMV (which reloads the input for every 4
rows), and is double-buffered: a program's next rows load while it sums the current ones,
and its first rows load while it computes the norm. With ``SILU_MUL`` a program owns the
same rows of the gate and the up half of ``[gate | up]`` and writes ``silu(gate) * up``,
rounding as the separate kernels do. The whole input row sits in registers: up to
``MAX_K`` columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_K = 8192


@dataclass(frozen=True, slots=True)
class PersistentGemvConfig:
    block_n: int = 2
    num_warps: int = 8
    programs_per_sm: int = 4
    num_stages: int = 1


# The fastest of 7 shapes on an H200 (bench/g2_fusions.py gemv): q/k/v with the norm 14.7
# µs (norm + GEMV apart: 15.7), gate/up with norm and SiLU 55.5 µs (apart: 58.5).
DEFAULT_CONFIG = PersistentGemvConfig(block_n=2, num_warps=8, programs_per_sm=4)
DEFAULT_SILU_CONFIG = PersistentGemvConfig(block_n=1, num_warps=8, programs_per_sm=4)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few programs, each looping over several row blocks


@triton.jit
def _load_rows(w_ptr, rows, cols, N, k_ok, stride_wn, EVEN_K: tl.constexpr):
    """Rows ``rows`` of the weight (zeros past ``N``: a prefetch beyond the last block)."""
    ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=(rows < N)[:, None], other=0.0)
    return tl.load(ptrs, mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, res_out_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr,
    N, K, stride_wn, eps, norm_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
    SILU_MUL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, K_P: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, K_P)
    k_ok = cols < K
    ty = out_ptr.dtype.element_ty
    # The first rows' weights are in flight while the norm is computed.
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _load_rows(w_ptr, rows, cols, N, k_ok, stride_wn, EVEN_K)
    if SILU_MUL:
        u = _load_rows(w_ptr + N * stride_wn, rows, cols, N, k_ok, stride_wn, EVEN_K)
    x = tl.load(x_ptr + cols, mask=k_ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if pid == 0:
            tl.store(res_out_ptr + cols, x, mask=k_ok)
    h = x.to(tl.float32)
    if HAS_NORM:
        normed = h * tl.math.rsqrt(tl.sum(h * h, axis=0) / K + eps)
        g = tl.load(norm_w_ptr + cols, mask=k_ok, other=0.0).to(tl.float32)
        # RMSNorm's roundings: with an offset, one at the end; without, the normed row and
        # then its product with the weight, each in the model dtype.
        if HAS_OFFSET:
            h = (normed * (norm_offset + g)).to(ty).to(tl.float32)
        else:
            h = (normed.to(ty).to(tl.float32) * g).to(ty).to(tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_N), step):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        # Double-buffered by hand: the next block's rows load while this one is summed.
        next_rows = rows + step * BLOCK_N
        w_next = _load_rows(w_ptr, next_rows, cols, N, k_ok, stride_wn, EVEN_K)
        y = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
        w = w_next
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        if SILU_MUL:
            u_next = _load_rows(w_ptr + N * stride_wn, next_rows, cols, N, k_ok, stride_wn, EVEN_K)
            up = tl.sum(u.to(tl.float32) * h[None, :], axis=1)
            u = u_next
            if HAS_BIAS:
                up += tl.load(bias_ptr + N + rows, mask=rows < N, other=0.0).to(tl.float32)
            gate = y.to(ty).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
            y = act * up.to(ty).to(tl.float32)
        tl.store(out_ptr + rows, y.to(ty), mask=rows < N)


def norm_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm_offset: float = 0.0,
    silu_and_mul: bool = False,
    config: PersistentGemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, s)`` for one row ``x`` ``[1, K]`` (``K <= MAX_K``) and ``weight`` ``[N, K]``:
    ``s = x + residual`` (``x`` itself without a residual), ``h = rms_norm(s) * (offset +
    norm_weight)`` (``s`` without a norm weight), ``y = h @ weight.T + bias``, and ``out``
    is ``y`` or, with ``silu_and_mul``, ``silu(y[:, :N/2]) * y[:, N/2:]``."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != 1 or k > MAX_K:
        raise ValueError(f"norm_gemv takes one row of at most {MAX_K}, got {tuple(x.shape)}")
    if silu_and_mul and n % 2:
        raise ValueError(f"silu_and_mul needs an even number of rows, got {n}")
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    res_out = x
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        res_out = torch.empty_like(x)
    out_rows = n // 2 if silu_and_mul else n
    cfg = config or (DEFAULT_SILU_CONFIG if silu_and_mul else DEFAULT_CONFIG)
    k_p = triton.next_power_of_2(k)
    blocks = triton.cdiv(out_rows, cfg.block_n)
    grid = (min(blocks, cfg.programs_per_sm * _num_sms(x.device)),)
    out = torch.empty((1, out_rows), dtype=x.dtype, device=x.device)
    _norm_gemv_kernel[grid](
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
        K_P=k_p,
        EVEN_K=k == k_p,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, res_out
