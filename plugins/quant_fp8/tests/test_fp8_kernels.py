"""fp8 numerics: activation quantization, the W8A8 emulation, and the ``_scaled_mm`` path
(padding, operand layout, row-wise scales) run through torch's CPU ``_scaled_mm`` where
this torch has one; the conformance kit over each way of multiplying."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_fp8_checkpoints import fp8_per_channel

import tessellm_quant_fp8.method as fp8_method
from tessellm.testing import check_quantization_method
from tessellm_quant_fp8.fp8 import (
    FP8_MAX,
    FP8_MAX_RECIPROCAL,
    MIN_TOKEN_SCALE,
    emulated_linear,
    pad_for_scaled_mm,
    quantize_activations,
    quantize_weight_per_channel,
    reference_linear,
    scaled_mm_linear,
)
from tessellm_quant_fp8.method import Fp8Method


def _cpu_scaled_mm() -> bool:
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    ones = torch.ones(16, 1)
    try:
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_scaled_mm = pytest.mark.skipif(
    not _cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm"
)


def test_activations_are_quantized_per_token_or_with_the_static_scale():
    # Seeded: a row of 40 samples times 1e-3 falls under the scale floor (amax below
    # 448 * MIN_TOKEN_SCALE = 1.95e-3) one draw in eight; its own row checks that case.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, generator=g) * torch.tensor([1e-2, 0.1, 1, 10, 100, 1e-5, 0])[:, None]
    x_q, scale = quantize_activations(x)
    assert x_q.dtype == torch.float8_e4m3fn and scale.shape == (7, 1)
    top = x_q.float().abs().amax(dim=1)
    assert torch.equal(top[:5], torch.full((5,), FP8_MAX))  # each row spans the fp8 range
    assert float(scale[5]) == pytest.approx(MIN_TOKEN_SCALE) and float(top[5]) < FP8_MAX / 8
    assert float(top[6]) == 0.0  # an all-zero row stays zero (no division by zero)
    torch.testing.assert_close(x_q.float() * scale, x, rtol=1 / 16, atol=1e-6)
    x_q, scale = quantize_activations(x, torch.tensor(0.01))
    assert torch.equal(scale, torch.full((7, 1), 0.01))
    assert float(x_q.float().abs().max()) == FP8_MAX  # rows beyond 448 * 0.01 clip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scales_are_computed_as_the_same_ieee_operation_on_every_device(dtype):
    # CUDA turns `t / 448.0` (a Python number) into `t * fl32(1/448)`, the CPU divides.
    # Activation scales multiply by that float32 constant on both; weight scales divide
    # by a 448 tensor on both. In float64 a product or quotient of two float32 values
    # rounded to float32 is the IEEE float32 result every device computes.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2048, 48, generator=g) * 4).to(dtype)
    amax = x.float().abs().amax(dim=1, keepdim=True)
    product = (amax.double() * FP8_MAX_RECIPROCAL).float()
    assert float(torch.tensor(1 / FP8_MAX, dtype=torch.float32)) == FP8_MAX_RECIPROCAL
    x_q, scale = quantize_activations(x)
    assert torch.equal(scale, product)
    assert torch.equal(
        x_q.float(), (x.float() / product).clamp(-FP8_MAX, FP8_MAX).to(x_q.dtype).float()
    )
    assert torch.equal(quantize_weight_per_channel(x)[1], (amax.double() / FP8_MAX).float())
    if dtype == torch.bfloat16:
        # Why it matters: the two scales differ by an ulp in about half the rows, and bf16
        # rows hold exact e4m3 midpoints that the ulp tips (the H100's failing rows).
        quotient = (amax / amax.new_full((1, 1), FP8_MAX)).clamp(min=MIN_TOKEN_SCALE)
        rounded = (x.float() / quotient).clamp(-FP8_MAX, FP8_MAX).to(x_q.dtype)
        tipped = (rounded.float() != x_q.float()).any(dim=1)
        assert 0 < int(tipped.sum()) < 2048 // 10


@pytest.mark.parametrize("static", [False, True])
def test_emulation_is_the_float64_product_of_the_fp8_operands(static):
    g = torch.Generator().manual_seed(0)
    q, w_scale = fp8_per_channel(torch.randn(24, 40, generator=g))
    x, bias = torch.randn(7, 40, generator=g), torch.randn(24, generator=g)
    input_scale = torch.tensor(0.004) if static else None
    y = emulated_linear(x, q, w_scale.reshape(-1), bias, input_scale)
    x_q, x_scale = quantize_activations(x, input_scale)
    ref = (x_q.double() @ q.double().T) * x_scale.double() * w_scale.double().T + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_float16_reference_does_not_overflow_on_unscaled_products():
    # 448 * 10 * 64 = 286720 unscaled, past float16's 65504; scaled: 286.72.
    q = torch.full((8, 64), FP8_MAX).to(torch.float8_e4m3fn)
    scale = torch.full((8,), 1e-3)
    y = reference_linear(torch.full((2, 64), 10.0, dtype=torch.float16), q, scale, None)
    torch.testing.assert_close(y.float(), torch.full((2, 8), 286.72), rtol=2e-3, atol=0)


def test_padding_keeps_the_weight_row_major_and_the_pad_inert():
    q, scale = fp8_per_channel(torch.randn(24, 40))
    q_p, s_p = pad_for_scaled_mm(q, scale.reshape(-1))
    assert q_p.shape == (32, 48) and q_p.is_contiguous() and s_p.shape == (32,)
    assert q_p.t().stride() == (1, 48)  # the column-major second operand cuBLASLt needs
    assert torch.equal(q_p[:24, :40].view(torch.uint8), q.view(torch.uint8))
    assert not q_p[24:].view(torch.uint8).any() and not q_p[:, 40:].view(torch.uint8).any()
    assert torch.equal(s_p[24:], torch.ones(8))
    aligned, _ = pad_for_scaled_mm(q_p, s_p)
    assert aligned.data_ptr() == q_p.data_ptr()  # nothing to pad: no copy


@needs_cpu_scaled_mm
@pytest.mark.parametrize("shape", [(40, 24), (64, 48)], ids=["padded", "aligned"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_scaled_mm_path_equals_the_emulation(shape, static):
    k, n = shape
    g = torch.Generator().manual_seed(1)
    q, w_scale = fp8_per_channel(torch.randn(n, k, generator=g))
    q_p, s_p = pad_for_scaled_mm(q, w_scale.reshape(-1))
    input_scale = torch.tensor(0.01) if static else None
    for m in (1, 5, 33):
        x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        y = scaled_mm_linear(x, q_p, s_p, n, bias, input_scale)
        ref = emulated_linear(x, q, w_scale.reshape(-1), bias, input_scale)
        assert y.shape == (m, n)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_cpu_scaled_mm
def test_layers_through_the_scaled_mm_kernel_equal_the_emulating_ones():
    from tessellm.interfaces.model import ModelContext, ParallelInfo
    from tessellm.layers.linear import QKVParallelLinear

    config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    outputs = {}
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(72, 40, generator=g)  # q: 2 heads of 12, k and v: 1 head each
    x = torch.randn(2, 3, 40, generator=g)
    for kernel in ("scaled_mm", "emulate"):
        method = Fp8Method(checkpoint=True, kernel=kernel)
        ctx = ModelContext(torch.float32, torch.device("cpu"), None, method, ParallelInfo())
        layer = QKVParallelLinear(40, 12, 4, 1, ctx)
        for shard, rows in zip("qkv", dense.split([48, 12, 12]), strict=True):
            for name, tensor in Fp8Method.from_config(config).checkpoint_tensors(rows).items():
                layer.weight_loader(getattr(layer, name), tensor, shard)
        method.process_weights_after_loading(layer)
        assert layer.fp8_kernel == kernel
        outputs[kernel] = layer(x)
    assert outputs["scaled_mm"].shape == (2, 3, 72)
    torch.testing.assert_close(outputs["scaled_mm"], outputs["emulate"], rtol=1e-5, atol=1e-5)


def test_w8a8_of_gaussian_weights_stays_near_the_dense_product():
    # What fp8 costs on ordinary weights (the kit's grid weights are its worst case):
    # ~2.5% per row weight-only, ~3.5% with activations rounded too.
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(256, 512, generator=g), torch.randn(64, 512, generator=g)
    q, scale = fp8_per_channel(w)
    dense = F.linear(x, w)
    for kernel_out, bound in (
        (F.linear(x, q.float()) * scale.T, 0.04),
        (emulated_linear(x, q, scale.reshape(-1), None), 0.05),
    ):
        rel = ((kernel_out - dense).norm(dim=1) / dense.norm(dim=1)).max()
        assert 0.005 < float(rel) < bound


CONFIGS = {
    "online": None,
    "dynamic": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "static": {"quant_method": "fp8", "activation_scheme": "static"},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_conforms_to_a_dense_linear_layer(config):
    result = check_quantization_method("fp8", quant_config=config)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert any("qkv" in case for case in result.checked)


@pytest.mark.parametrize("kernel", ["emulate", "scaled_mm"])
def test_conforms_with_the_gpu_arithmetic_on_the_cpu(kernel, monkeypatch):
    if kernel == "scaled_mm" and not _cpu_scaled_mm():
        pytest.skip("this torch has no CPU torch._scaled_mm")
    monkeypatch.setattr(Fp8Method, "default_off_gpu_kernel", kernel)
    # One row too through _scaled_mm: the Triton GEMV (test_fp8_gemv.py) would need the
    # interpreter, which only some test orders had switched on before Triton loaded.
    monkeypatch.setattr(fp8_method, "_gemv_installed", lambda: False)
    result = check_quantization_method("fp8", quant_config=CONFIGS["dynamic"])
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
