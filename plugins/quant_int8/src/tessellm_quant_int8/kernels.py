"""Int8 quantizers and matmuls: the functions the methods (and the compressed-tensors
package's int8 schemes) are built on.

Layout (compressed-tensors / SmoothQuant, as llm-compressor writes W8A8 int8): a linear's
``weight`` is int8 ``[N, K]`` (output channels by input features) and ``weight_scale``
float32 ``[N, 1]``, one symmetric scale per output channel: ``W ~= weight * weight_scale``.
Activations are quantized per token (row) when the product runs, symmetrically, with the
scale ``max|x| / 127``.

Which kernel computes the int8 product ``xq @ q.T``:

- CUDA: ``torch._int_mm`` (cuBLASLt, int32 out). Its rules: ``M > 16``, ``K`` and ``N``
  multiples of 8; the weight goes in as the transposed view of the ``[N, K]`` tensor
  (column-major ``[K, N]``). Fewer rows are padded with zero rows (a decode step reads
  the whole weight either way); other K/N use the float matmul below.
- CPU: ``torch._int_mm`` has no shape rules there, but on this project's machine (AMD
  EPYC, family 23, AVX2, no AVX-512 or VNNI) it is 5-20x slower than a float matmul of the
  same integers (bench/int8_matmul.py; its docstring has the numbers; rerun it on a CPU
  with VNNI or AMX). Up to :data:`CPU_PACKED_MAX_ROWS` rows the product runs through
  ``aten._weight_int8pack_mm``, which keeps the weight int8 and multiplies it by the
  integer-valued activations held in bf16 (exact products, float32 sums; the int32
  result comes back rounded to bf16, a relative 2**-9, before the scales are applied in
  float32); beyond, the float32 matmul of the integers (the weight cast per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127
# cuBLASLt's int8 GEMM (torch._int_mm on CUDA) refuses M <= 16 and K, N not multiples of 8.
CUDA_INT_MM_MIN_ROWS = 17
CUDA_INT_MM_ALIGN = 8
# Up to this many rows the CPU multiplies by the int8 weight through
# aten._weight_int8pack_mm in bf16; beyond it a float32 matmul with the weight cast per
# call wins (SmolLM2-135M's MLP shapes on that EPYC: about even at 16 rows, the
# float matmul ahead from 24 rows; see bench/int8_matmul.py).
CPU_PACKED_MAX_ROWS = 16
# aten._weight_int8pack_mm is fast in bf16 only: in float32 and float16 it runs a scalar
# loop, 4-10x slower than casting the weight and calling the dense kernel.
_INT8PACK = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a dense ``[N, K]`` weight: ``(q, scale)``,
    ``q`` int8 ``[N, K]`` in ``[-127, 127]`` and ``scale`` float32 ``[N, 1]`` with
    ``scale = max|row| / 127`` (a tiny positive scale for an all-zero row), so
    ``weight ~= q * scale`` within half a step per element."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    scale = _symmetric_scale(w)
    q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_per_channel_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * scale`` as a dense ``[N, K]`` weight in ``dtype`` (computed in float32)."""
    return (q.float() * scale.float().reshape(-1, 1)).to(dtype)


def _symmetric_scale(x: torch.Tensor) -> torch.Tensor:
    """``max|row| / 127`` per row, float32 ``[rows, 1]``; never zero (an all-zero row
    gets the smallest normal float, so it quantizes to zeros)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    return amax.div_(INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)


def quantize_per_token_int8(
    x: torch.Tensor, out_dtype: torch.dtype = torch.int8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row of ``x [M, K]``: ``(q [M, K], scale float32 [M, 1])``
    with ``scale = max|row| / 127``. ``q`` holds integers in ``[-127, 127]``, as int8 or
    (``out_dtype``) a float type that holds them exactly."""
    xf = x.float()
    scale = _symmetric_scale(xf)
    # |x| / scale <= 127 up to rounding of the division, so no clamp is needed.
    return torch.round(xf / scale).to(out_dtype), scale


def _int_mm_cuda(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    rows, k = xq.shape
    if k % CUDA_INT_MM_ALIGN or q.shape[0] % CUDA_INT_MM_ALIGN:
        return None
    if rows < CUDA_INT_MM_MIN_ROWS:
        padded = F.pad(xq, (0, 0, 0, CUDA_INT_MM_MIN_ROWS - rows))
        return torch._int_mm(padded, q.t())[:rows]
    return torch._int_mm(xq, q.t())


def packed_scale(scale: torch.Tensor) -> torch.Tensor:
    """The channel scales as ``aten._weight_int8pack_mm`` takes them: ``[N]`` bf16. A
    method keeps them on the layer (a compiled CPU decode step needs them as an input:
    inductor's lowering of the op refuses a scale computed inside the graph)."""
    return scale.reshape(-1).to(torch.bfloat16)


def _cpu_packed(rows: torch.Tensor) -> bool:
    """Whether the CPU's packed kernel takes these rows (see CPU_PACKED_MAX_ROWS)."""
    packed = rows.device.type == "cpu" and rows.shape[0] <= CPU_PACKED_MAX_ROWS
    return packed and _INT8PACK is not None


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    use_int_mm: bool | None = None,
    scale_bf16: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8: ``x @ W.T + bias`` with ``W = q * scale`` (int8 ``q [N, K]``, float32
    ``scale [N, 1]`` or ``[N]``) and ``x [..., K]`` quantized per token on the fly. The
    integer product is rescaled by the outer product of the token and channel scales in
    float32; the result is in ``x``'s dtype. ``use_int_mm``: True takes
    ``torch._int_mm`` on the CPU too (any shape), False never takes it (a float matmul of
    the integers instead); None picks the kernel by device and shape (module docstring).
    On CUDA ``torch._int_mm`` runs unless False, wherever K and N allow it.
    ``scale_bf16``: :func:`packed_scale` of ``scale``, if kept (else made per call), for
    the CPU's packed kernel, which applies the channel scale in bf16."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if use_int_mm is not True and _cpu_packed(rows):
        xq, x_scale = quantize_per_token_int8(rows, torch.bfloat16)
        channel = packed_scale(scale) if scale_bf16 is None else scale_bf16
        out = _INT8PACK(xq, q, channel).float().mul_(x_scale)
    else:
        xq, x_scale = quantize_per_token_int8(rows)
        acc = None
        if use_int_mm is not False and rows.device.type == "cuda":
            acc = _int_mm_cuda(xq, q)
        elif use_int_mm:
            acc = torch._int_mm(xq, q.t())
        if acc is None:  # exact while |sums| < 2**24 (127 * 127 * K reaches it at K ~ 1040)
            acc = F.linear(xq.float(), q.float())
        out = acc.float().mul_(x_scale).mul_(scale.reshape(1, -1))
    if bias is not None:
        out = out.add_(bias)
    return out.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def weight_only_int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scale_bf16: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int8: ``x @ (q * scale).T + bias``, ``x`` not quantized. The channel
    scale factors out of the sum, ``y[:, n] = scale[n] * (x @ q.T)[:, n]``. On the CPU in
    bf16, up to :data:`CPU_PACKED_MAX_ROWS` rows, ``aten._weight_int8pack_mm`` reads the
    int8 weight directly (with ``scale_bf16``, as for :func:`int8_linear`); otherwise the
    weight is cast for the call and the product taken in float32 (bf16 and fp16 matmuls
    are the slow ones on a CPU without native bf16: see bench/int8_matmul.py), or in
    ``x``'s dtype on a GPU."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    n = q.shape[0]
    if rows.device.type == "cpu":
        if rows.dtype == torch.bfloat16 and _cpu_packed(rows):
            channel = packed_scale(scale) if scale_bf16 is None else scale_bf16
            out = _INT8PACK(rows.contiguous(), q, channel)
            out = out if bias is None else out + bias
        else:
            out = F.linear(rows.float(), q.float()).mul_(scale.reshape(-1).float())
            out = (out if bias is None else out.add_(bias)).to(x.dtype)
    else:
        out = F.linear(rows, q.to(rows.dtype)) * scale.reshape(-1).to(rows.dtype)
        out = out if bias is None else out + bias
    return out.view(*x.shape[:-1], n)
