"""The W8A8 GEMM cases shared by the GPU test (``test_fp8_gpu.py``) and its CPU mirror
(``test_fp8_scaled_mm_cpu.py``): the same layer, data and error bound on either device.

The bound, from the arithmetic. ``_scaled_mm`` and the float32 emulation multiply the same
fp8 operands (the quantizer rounds identically on every device: see
``tessellm_quant_fp8.fp8.FP8_MAX_RECIPROCAL``); the products of two e4m3 values are exact
in float32, so what separates them is:

- the output's rounding to the dtype ``_scaled_mm`` writes (bf16 for CUTLASS's row-wise
  kernel): at most its unit roundoff ``u = eps / 2`` (bf16 2^-8, fp16 2^-11) of each
  element, so of a row's norm;
- the bias added in the run dtype: one more ``u`` of the run dtype, of the biased row;
- the sums: in another order, and on Hopper's fp8 tensor cores with fewer bits than
  float32 (about 14 kept within an MMA, DeepSeek-V3 report 3.3.2, before the kernel adds
  the partial sums in float32): at most ``(2^-13 + 2 K 2^-24) * sum |x_q q| s_x s_w`` of
  each element (``sum_error``), whose rows are ~5x the product's at K = 48.

A row's relative error is therefore at most
``u_out * |y| / |y + b| + u_run + |sum_error| / |y + b|``: about 0.0086 in bf16, 0.0017
in fp16 and 7e-4 in float32 at K = 48. What it must catch is larger: one activation
rounded to the neighbouring e4m3 value (a step of 1/16 to 1/8 of it) moves a row of
K = 48 by ~0.02, which is the failure this bound exposed on an H100 (row errors 0.021
and 0.011, an activation quantizer that rounded ties differently on the GPU); a
per-token or per-channel scale applied to the wrong row, or twice, moves it by order 1
on these data, whose rows and channels span 64x and 16x in magnitude (powers of two, so
the fp8 values and their rounding are those of the plain normal samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from quant_fp8_checkpoints import fp8_per_channel

from tessellm_quant_fp8.fp8 import emulated_linear, quantize_activations
from tessellm_quant_fp8.method import Fp8Method

DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic"}
STATIC = {"quant_method": "fp8", "activation_scheme": "static"}
# (K, N): aligned, padded on both K and N (to 48 and 32), and a real projection's width.
SHAPES = [(64, 48), (40, 24), (4096, 1024)]
# Rows per case, drawn in this order; on the GPU one row takes the weight-only GEMV.
ROWS = (1, 7, 64)
STATIC_INPUT_SCALE = 0.01
# The relative precision of a sum on fp8 tensor cores (see the module docstring).
TENSOR_CORE_SUM_UNIT = 2.0**-13


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def case_weights(k: int, n: int, dtype: torch.dtype, seed: int = 0):
    """``(generator, q, scale [N, 1], bias)``: per-channel fp8 weights of normal rows scaled
    by 2^-2 .. 2^2, and a small bias in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    gains = 2.0 ** (torch.arange(n) % 5 - 2).float()
    q, scale = fp8_per_channel(torch.randn(n, k, generator=g) * gains[:, None])
    bias = (torch.randn(n, generator=g) * 0.01).to(dtype)
    return g, q, scale, bias


def case_activations(g: torch.Generator, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``[m, k]`` normal rows scaled by 2^-3 .. 2^3, in ``dtype``."""
    gains = 2.0 ** (torch.arange(m) % 7 - 3).float()
    return (torch.randn(m, k, generator=g) * gains[:, None]).to(dtype)


def fp8_layer(config, q, scale, bias, input_scale, dtype, device, kernel="auto"):
    """A ColumnParallelLinear of the fp8 method on ``device``, loaded from ``q``/``scale``
    (and ``input_scale`` for a static config) as an fp8 checkpoint would be."""
    from tessellm.interfaces.model import ModelContext, ParallelInfo
    from tessellm.layers.linear import ColumnParallelLinear

    method = Fp8Method.from_config(config)
    method.kernel = kernel
    ctx = ModelContext(dtype, torch.device(device), None, method, ParallelInfo())
    with torch.device(device):
        layer = ColumnParallelLinear(q.shape[1], q.shape[0], ctx, bias=bias is not None)
    layer.weight_loader(layer.weight, q.to(device))
    layer.weight_loader(layer.weight_scale, scale.to(device))
    if bias is not None:
        layer.weight_loader(layer.bias, bias.to(device))
    if input_scale is not None:
        layer.weight_loader(layer.input_scale, input_scale.to(device))
    method.process_weights_after_loading(layer)
    return layer


@dataclass
class Emulation:
    """The float32 emulation of one case: ``unbiased`` and ``ref`` (float32, without and
    with the bias), ``rounded`` (what the GPU writes: the product rounded to its output
    dtype, the bias added in the run dtype) and ``sum_error`` (what the sums may differ
    by, see the module docstring)."""

    unbiased: torch.Tensor
    ref: torch.Tensor
    rounded: torch.Tensor
    sum_error: torch.Tensor


def emulate(x, q, scale, bias, input_scale, out_dtype) -> Emulation:
    """The emulation of ``x`` (run dtype, on the CPU) through ``q``/``scale`` [N, 1]."""
    scale = scale.reshape(-1)
    unbiased = emulated_linear(x.float(), q, scale, None, input_scale)
    rounded = emulated_linear(x, q, scale, bias, input_scale, out_dtype)
    x_q, x_scale = quantize_activations(x, input_scale)
    magnitude = (x_q.float().abs() @ q.float().abs().T) * x_scale * scale
    unit = TENSOR_CORE_SUM_UNIT + 2 * x.shape[1] * unit_roundoff(torch.float32)
    return Emulation(unbiased, unbiased + bias.float(), rounded, unit * magnitude)


def assert_within_one_output_ulp(y: torch.Tensor, em: Emulation, out_dtype, run_dtype) -> None:
    """``y`` is the rounded emulation up to what the summation order can tip: each element
    within one ulp of the output dtype, one of the bias add, and the sums' own error."""
    y = y.float().cpu()
    bound = (
        torch.finfo(out_dtype).eps * (em.unbiased.abs() + em.sum_error)
        + torch.finfo(run_dtype).eps * em.ref.abs()
        + em.sum_error
    )
    excess = (y - em.rounded.float()).abs() - bound
    assert float(excess.max()) <= 0, (float(excess.max()), int((excess > 0).sum()))


def row_errors(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each row's relative error ``|y - ref| / |ref|`` (float32, on the CPU)."""
    y, ref = y.float().cpu(), ref.float().cpu()
    return (y - ref).norm(dim=1) / ref.norm(dim=1)


def row_bounds(
    unbiased: torch.Tensor,
    ref: torch.Tensor,
    sum_error: torch.Tensor,
    out_dtype: torch.dtype,
    run_dtype: torch.dtype,
) -> torch.Tensor:
    """The module docstring's bound on each row's error against ``ref``, the float32
    product ``unbiased`` plus the bias, whose sums may be ``sum_error`` apart."""
    norm = ref.float().norm(dim=1)
    ratio = unbiased.float().norm(dim=1) / norm
    return (
        unit_roundoff(out_dtype) * ratio + unit_roundoff(run_dtype) + sum_error.norm(dim=1) / norm
    )


def case_row_bounds(em: Emulation, out_dtype: torch.dtype, run_dtype: torch.dtype) -> torch.Tensor:
    return row_bounds(em.unbiased, em.ref, em.sum_error, out_dtype, run_dtype)
