"""fp8 (float8_e4m3fn) numerics: the reference quantizers and the three ways to multiply.

A weight ``W [N, K]`` is stored as ``q = round_e4m3(W / s)`` with one float32 scale ``s``
per output channel (a per-tensor checkpoint scale is that scale repeated), so
``W ~= q * s[:, None]``; activations are quantized per token (``s_x = amax(|x_row|) / 448``)
or with the checkpoint's static per-tensor ``input_scale``.

- :func:`reference_linear`: weight-only, ``x @ q.T * s`` in the run dtype (the CPU and
  older-GPU path: no fp8 arithmetic there, so rounding the activations would only add
  error and time).
- :func:`emulated_linear`: W8A8 as the GPU computes it, in float32: activations rounded to
  fp8 the same way, products of fp8 values summed in float32, then both scales.
- :func:`scaled_mm_linear`: W8A8 through ``torch._scaled_mm`` with row-wise scales (CUDA
  compute capability >= 8.9), on weights padded by :func:`pad_for_scaled_mm`.

These functions are public so that other methods storing fp8 weights (compressed-tensors'
fp8 schemes) can share them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Smallest per-token activation scale (as vLLM): a row of near-zeros is not blown up to
# the top of the fp8 range, where its rounding would no longer be relative to the others.
MIN_TOKEN_SCALE = 1.0 / (FP8_MAX * 512.0)
# torch._scaled_mm (cuBLASLt / CUTLASS) needs K and N to be multiples of 16.
SCALED_MM_ALIGN = 16
# Per-token activation scales are ``amax * (1/448)`` with this float32 constant, never
# ``amax / 448``: CUDA computes a tensor divided by a Python number as a product with the
# number's float32 reciprocal, the CPU as a true division, and the two differ by an ulp in
# about half the rows. With bf16 inputs (8-bit mantissas) ``x / scale`` then often lands
# exactly on a midpoint between two e4m3 values, which that ulp tips one way on the GPU
# and the other on the CPU: one activation a whole fp8 step apart in ~2% of the rows (row
# errors of 0.021 at K = 48 between an H100's _scaled_mm and the CPU emulation). A product
# with a float32 constant, like a division by a scale tensor, is the same IEEE operation
# on every device, and costs no kernel of its own.
FP8_MAX_RECIPROCAL = float(torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))


def activation_scale_of_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` as float32, rounded the same on every device (see
    ``FP8_MAX_RECIPROCAL``), so that activations quantized with it are the same fp8 bits
    on the CPU and the GPU."""
    return amax.float() * FP8_MAX_RECIPROCAL


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn [N, K], scale float32 [N, 1])`` of a dense ``[N, K]`` weight, with
    ``scale = amax(|row|) / 448`` as vLLM and llm-compressor write it (an all-zero row gets
    scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    # A true division by a tensor (not by the Python number: see FP8_MAX_RECIPROCAL), the
    # same on every device and equal to ``amax / 448`` as checkpoint writers compute it on
    # the CPU; weights are quantized once, so the divisor's tensor costs nothing per step.
    divided = amax / amax.new_full((1, 1), FP8_MAX)
    scale = torch.where(amax > 0, divided, torch.ones_like(amax))
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """``q * scale`` in ``dtype``; ``scale`` broadcasts (``[]``, ``[N, 1]``)."""
    return (q.float() * scale.float()).to(dtype)


def quantize_activations(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q float8 [M, K], scale float32 [M, 1])`` of a 2-D activation: per token
    (dynamic) or with the static per-tensor ``input_scale`` (repeated per row, since
    ``_scaled_mm`` cannot pair a tensor-wise activation scale with row-wise weight scales)."""
    xf = x.float()
    if input_scale is None:
        amax = xf.abs().amax(dim=1, keepdim=True)
        scale = activation_scale_of_amax(amax).clamp_(min=MIN_TOKEN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    x_q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_q, scale


def _finish(y: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.to(dtype)
    return y + bias if bias is not None else y


def reference_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only: ``(x @ q.T) * scale`` in ``x``'s dtype, ``scale`` ``[N]``. fp8 values
    are exact in every run dtype, and a per-output-channel scale commutes with the matmul,
    so no dense ``[N, K]`` copy is scaled, only the ``[M, N]`` output. In float16 the
    unscaled products (fp8 values up to 448) can pass its 65504 limit, so there the weight
    is scaled first. Either way the dense weight is a per-call temporary: nothing is kept."""
    if x.dtype == torch.float16:
        y = F.linear(x, dequantize(q, scale.reshape(-1, 1), x.dtype))
    else:
        y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


def emulated_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A8 as ``_scaled_mm`` computes it, in float32: ``(x_q @ q.T) * s_x * s_w``, rounded
    to ``out_dtype`` (what ``_scaled_mm`` writes, see :func:`scaled_mm_out_dtype`; default
    ``x``'s dtype) before the bias is added in ``x``'s dtype. The products of two fp8 values
    are exact in float32, so this differs from the GPU only in the order of the float32
    sums (a few float32 ulps, which can tip the output's rounding by one of its ulps)."""
    x_q, x_scale = quantize_activations(x, input_scale)
    y = F.linear(x_q.float(), q.float()) * x_scale * scale.float()
    if out_dtype is not None:
        y = y.to(out_dtype)
    return _finish(y, x.dtype, bias)


def pad_for_scaled_mm(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, K]`` and ``scale [N]`` zero/one-padded to multiples of 16 (what
    ``_scaled_mm`` accepts), ``q`` kept row-major so that ``q.t()`` is the column-major
    second operand cuBLASLt needs on Hopper. Padded rows yield outputs that are sliced off;
    padded columns meet zero-padded activations."""
    n, k = q.shape
    n_pad, k_pad = -n % SCALED_MM_ALIGN, -k % SCALED_MM_ALIGN
    if n_pad or k_pad:
        padded = torch.zeros(n + n_pad, k + k_pad, dtype=torch.uint8, device=q.device)
        padded[:n, :k] = q.view(torch.uint8)  # fp8 zero is the all-zero byte
        q = padded.view(FP8_DTYPE)
        scale = torch.cat([scale, scale.new_ones(n_pad)])
    return q.contiguous(), scale.float().contiguous()


@functools.cache
def scaled_mm_out_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The output dtype ``_scaled_mm`` gives row-wise on ``device``: ``dtype`` where the
    build allows it, else bfloat16 (cast after). CUTLASS's row-wise kernel (compute
    capability 8.9, or cuBLASLt older than 12.9) writes only bf16 in older torch, bf16/fp16
    in newer and fp32 too in the newest, so one tiny call per device and dtype decides,
    at load time (never while a CUDA graph is being captured)."""
    a = torch.zeros(SCALED_MM_ALIGN, SCALED_MM_ALIGN, device=device).to(FP8_DTYPE)
    ones = torch.ones(SCALED_MM_ALIGN, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=dtype)
    except (RuntimeError, ValueError):
        return torch.bfloat16
    return dtype


def scaled_mm_linear(
    x: torch.Tensor,
    q_padded: torch.Tensor,
    scale_padded: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A8 through ``torch._scaled_mm``: ``x [M, K]`` quantized per token (or with
    ``input_scale``), times ``q_padded [N16, K16]`` (from :func:`pad_for_scaled_mm`) with
    row-wise scales ``[M, 1]`` and ``[1, N16]`` (float32, contiguous), accumulated in
    float32; the output is ``[M, out_features]`` in ``x``'s dtype."""
    k_padded = q_padded.shape[1]
    if x.shape[1] != k_padded:
        x = F.pad(x, (0, k_padded - x.shape[1]))
    x_q, x_scale = quantize_activations(x, input_scale)
    y = torch._scaled_mm(
        x_q,
        q_padded.t(),
        scale_a=x_scale,
        scale_b=scale_padded.view(1, -1),
        out_dtype=out_dtype or x.dtype,
    )
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    return _finish(y, x.dtype, bias)
