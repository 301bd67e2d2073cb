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
- CPU: ``torch._int_mm`` has no shape rules there but is a slow kernel on CPUs without
  VNNI: 9-20x slower than a float matmul of the same integers (bench/int8_matmul.py,
  numbers in the package README). Up to :data:`CPU_PACKED_MAX_ROWS` rows the product runs
  through ``aten._weight_int8pack_mm``, which keeps the weight int8 and multiplies it by
  the integer-valued activations held in bf16 (exact products, float32 sums; the int32
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
# call wins (measured on a 2-core AVX2 EPYC, SmolLM2-135M's 1536x576: 16 rows about
# even, 24 rows 15% and 64 rows 30-40% in favour of the float matmul).
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


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    use_int_mm: bool | None = None,
) -> torch.Tensor:
    """W8A8: ``x @ W.T + bias`` with ``W = q * scale`` (int8 ``q [N, K]``, float32
    ``scale [N, 1]`` or ``[N]``) and ``x [..., K]`` quantized per token on the fly. The
    integer product is rescaled by the outer product of the token and channel scales in
    float32; the result is in ``x``'s dtype. ``use_int_mm``: True takes
    ``torch._int_mm`` on the CPU too (any shape), False never takes it (a float matmul of
    the integers instead); None picks the kernel by device and shape (module docstring).
    On CUDA ``torch._int_mm`` runs unless False, wherever K and N allow it."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    packed = (
        use_int_mm is not True
        and rows.device.type == "cpu"
        and m <= CPU_PACKED_MAX_ROWS
        and _INT8PACK is not None
    )
    if packed:
        xq, x_scale = quantize_per_token_int8(rows, torch.bfloat16)
        ones = torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device)
        acc = _INT8PACK(xq, q, ones).float()
    else:
        xq, x_scale = quantize_per_token_int8(rows)
        acc = None
        if use_int_mm is not False and rows.device.type == "cuda":
            acc = _int_mm_cuda(xq, q)
        elif use_int_mm:
            acc = torch._int_mm(xq, q.t())
        if acc is None:  # exact while |sums| < 2**24 (127 * 127 * K reaches it at K ~ 1040)
            acc = F.linear(xq.float(), q.float())
        acc = acc.float()
    out = acc.mul_(x_scale).mul_(scale.reshape(1, -1))
    if bias is not None:
        out = out.add_(bias)
    return out.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def weight_only_int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only int8: ``x @ (q * scale).T + bias``, ``x`` not quantized. The channel
    scale factors out of the sum, ``y[:, n] = scale[n] * (x @ q.T)[:, n]``. On the CPU in
    bf16, up to :data:`CPU_PACKED_MAX_ROWS` rows, ``aten._weight_int8pack_mm`` reads the
    int8 weight directly (the scale rounded to bf16); otherwise the weight is cast for the
    call and the product taken in float32 (bf16 and fp16 matmuls are the slow ones on a
    CPU without native bf16: see bench/int8_matmul.py), or in ``x``'s dtype on a GPU."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    n = q.shape[0]
    scale_row = scale.reshape(-1)
    if rows.device.type == "cpu":
        if rows.dtype == torch.bfloat16 and rows.shape[0] <= CPU_PACKED_MAX_ROWS and _INT8PACK:
            out = _INT8PACK(rows.contiguous(), q, scale_row.to(torch.bfloat16))
            out = out if bias is None else out + bias
        else:
            out = F.linear(rows.float(), q.float()).mul_(scale_row.float())
            out = (out if bias is None else out.add_(bias)).to(x.dtype)
    else:
        out = F.linear(rows, q.to(rows.dtype)) * scale_row.to(rows.dtype)
        out = out if bias is None else out + bias
    return out.view(*x.shape[:-1], n)
