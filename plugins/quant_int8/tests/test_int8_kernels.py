"""The int8 quantizers and matmuls against independent float64 references written here."""

from __future__ import annotations

import pytest
import torch

from tessellm_quant_int8 import (
    dequantize_per_channel_int8,
    int8_linear,
    kernels,
    quantize_per_channel_int8,
    quantize_per_token_int8,
    weight_only_int8_linear,
)


def reference_per_row_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row in float64: step = max|row| / 127, q = round(t / step)."""
    t = t.double()
    step = t.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(t / step), step


def test_per_channel_weights_dequantize_to_an_independent_per_channel_dequantization():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes: a scale taken per tensor, or per input column,
    # would not reproduce the reference.
    weight = torch.randn(48, 80, generator=g) * torch.logspace(-3, 1, 48).unsqueeze(1)
    q, scale = quantize_per_channel_int8(weight)
    assert q.dtype == torch.int8 and q.shape == (48, 80)
    assert scale.dtype == torch.float32 and scale.shape == (48, 1)
    ref_q, ref_step = reference_per_row_int8(weight)
    torch.testing.assert_close(scale.double(), ref_step, rtol=1e-6, atol=0)
    # float32 and float64 may round an exact half differently: at most one step apart.
    assert (q.double() - ref_q).abs().max() <= 1
    assert (q.double() != ref_q).float().mean() < 1e-3
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses the whole range
    dense = dequantize_per_channel_int8(q, scale)
    assert ((dense.double() - weight.double()).abs() <= ref_step * 0.5 + 1e-9).all()
    torch.testing.assert_close(dense.double(), ref_q * ref_step, rtol=1e-6, atol=1e-12)


def test_an_all_zero_row_quantizes_to_zeros():
    weight = torch.randn(4, 16)
    weight[2] = 0
    q, scale = quantize_per_channel_int8(weight.bfloat16())
    assert q[2].eq(0).all() and scale[2] > 0 and torch.isfinite(scale).all()
    assert dequantize_per_channel_int8(q, scale)[2].eq(0).all()


def test_per_token_activations_match_the_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 96, generator=g) * torch.logspace(-2, 2, 7).unsqueeze(1)
    q, scale = quantize_per_token_int8(x)
    ref_q, ref_step = reference_per_row_int8(x)
    torch.testing.assert_close(scale.double(), ref_step, rtol=1e-6, atol=0)
    assert q.dtype == torch.int8 and (q.double() - ref_q).abs().max() <= 1
    as_bf16, _ = quantize_per_token_int8(x, torch.bfloat16)
    assert torch.equal(as_bf16.to(torch.int8), q)  # bf16 holds the integers exactly


def w8a8_reference(x, q, scale, bias):
    """x quantized per token (float64), times q * scale, plus bias."""
    xq, xs = reference_per_row_int8(x.reshape(-1, x.shape[-1]))
    out = (xq * xs) @ (q.double() * scale.double().reshape(-1, 1)).t()
    return out if bias is None else out + bias.double()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().reshape(ref.shape) - ref).norm() / ref.norm())


@pytest.mark.parametrize("rows", [1, 5, kernels.CPU_PACKED_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("use_int_mm", [None, True, False])
def test_int8_linear_every_cpu_path_computes_the_w8a8_product(rows, use_int_mm):
    g = torch.Generator().manual_seed(2)
    q, scale = quantize_per_channel_int8(torch.randn(72, 136, generator=g))
    bias = torch.randn(72, generator=g)
    x = torch.randn(rows, 136, generator=g)
    ref = w8a8_reference(x, q, scale, bias)
    y = int8_linear(x, q, scale, bias, use_int_mm=use_int_mm)
    assert y.shape == (rows, 72) and y.dtype == torch.float32
    packed = use_int_mm is not True and rows <= kernels.CPU_PACKED_MAX_ROWS
    # The packed kernel returns the integer sums rounded to bf16 (relative 2**-9); the
    # others are exact integer products rescaled in float32.
    assert relative_error(y, ref) < (4e-3 if packed else 1e-6)


def test_int8_linear_keeps_leading_dims_and_dtype():
    g = torch.Generator().manual_seed(3)
    q, scale = quantize_per_channel_int8(torch.randn(24, 32, generator=g))
    x = torch.randn(2, 3, 32, generator=g).bfloat16()
    y = int8_linear(x, q, scale.view(-1), None)  # a [N] scale works too
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    assert relative_error(y.float(), w8a8_reference(x.float(), q, scale, None)) < 1e-2


def test_cuda_row_padding_gives_the_unpadded_product():
    """The CUDA branch (rows padded to cuBLASLt's minimum, K/N checked) run on CPU
    tensors: torch._int_mm takes any shape there, so the padding logic is what is tested."""
    g = torch.Generator().manual_seed(4)
    xq = torch.randint(-127, 128, (3, 64), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
    out = kernels._int_mm_cuda(xq, q)
    assert out.shape == (3, 40) and torch.equal(out, (xq.int() @ q.int().t()))
    assert kernels._int_mm_cuda(xq[:, :60], q[:, :60]) is None  # K not a multiple of 8
    assert kernels._int_mm_cuda(xq, q[:36]) is None  # N not a multiple of 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 40])
def test_weight_only_matches_the_dequantized_matmul(dtype, rows):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 96, generator=g) * torch.logspace(-2, 0, 48).unsqueeze(1)
    q, scale = quantize_per_channel_int8(weight)
    bias = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    y = weight_only_int8_linear(x, q, scale, bias)
    assert y.shape == (rows, 48) and y.dtype == dtype
    ref = x.double() @ (q.double() * scale.double()).t() + bias.double()
    # Only the run dtype's rounding (of the output, and in bf16 of the scale): no
    # activation quantization.
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert relative_error(y, ref) < tol
