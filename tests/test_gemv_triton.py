"""The Triton one-row GEMV and the ``unquantized_gemv`` method that routes to it.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined) in fp32 on small shapes; on a GPU also in bf16 at Llama-3-8B's
projection shapes. Results are compared with a float64 product.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_triton_plugins

use_triton_plugins("kernels/triton/src")

from tessellm.interfaces.quantization import QuantizationMethod  # noqa: E402
from tessellm_triton_kernels.dense_gemv import UnquantizedGemv  # noqa: E402
from tessellm_triton_kernels.gemv import GemvConfig, gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize(
    ("n", "k", "config"),
    [
        (64, 256, GemvConfig(8, 64, 4)),  # both dimensions whole tiles
        (37, 200, GemvConfig(8, 64, 4)),  # ragged rows and a ragged last K step
        (5, 48, GemvConfig(16, 128, 4)),  # fewer rows and columns than one tile
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_float64(n, k, config, with_bias):
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen).to(DEVICE)
    # x as a strided view (one row of a wider buffer), as a split of a fused output gives.
    x = torch.randn(3, k + 8, generator=gen).to(DEVICE)[1:2, 4 : 4 + k]
    bias = torch.randn(n, generator=gen).to(DEVICE) if with_bias else None
    ref = x.double() @ weight.double().T + (bias.double() if with_bias else 0.0)
    out = gemv(x, weight, bias, config)
    assert out.shape == (1, n) and out.dtype == x.dtype
    assert _rel_err(out, ref) < 1e-5


def test_gemv_takes_one_row_only():
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.ones(2, 16, device=DEVICE), torch.ones(8, 16, device=DEVICE))


class _Layer(torch.nn.Module):
    def __init__(self, method: QuantizationMethod, n: int, k: int, dtype: torch.dtype) -> None:
        super().__init__()
        method.create_weights(self, k, n, dtype)


def test_method_stores_dense_weights_and_falls_back_off_gpu():
    method = UnquantizedGemv()
    layer = _Layer(method, 24, 40, torch.float32)
    assert tuple(layer.weight.shape) == (24, 40) and layer.weight.dtype == torch.float32
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(1, 40)
    # CPU and fp32 rows go to torch's linear: the same bits as the plain method.
    assert torch.equal(method.apply(layer, x, None), torch.nn.functional.linear(x, layer.weight))


@gpu
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_gpu_bf16_llama_shapes(n, k):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = x.double() @ weight.double().T
    assert _rel_err(gemv(x, weight), ref) < 1e-2


@gpu
def test_gpu_method_routes_one_row_to_the_gemv_and_batches_to_cublas():
    method = UnquantizedGemv()
    layer = _Layer(method, 512, 256, torch.bfloat16).cuda()
    torch.nn.init.normal_(layer.weight, std=0.02)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    one = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    many = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(method.apply(layer, one, bias), gemv(one, layer.weight, bias))
    assert torch.equal(
        method.apply(layer, many, bias), torch.nn.functional.linear(many, layer.weight, bias)
    )


def test_cuda_platform_registers_the_method_and_picks_it_for_half_types():
    cuda_platform = pytest.importorskip("tessellm_cuda.platform")
    from tessellm.plugins import get_plugins

    registration = get_plugins().get("quantization_methods", "unquantized_gemv")
    assert registration is not None and registration.load() is UnquantizedGemv
    platform = cuda_platform.CudaPlatform()
    assert platform.default_quantization(torch.bfloat16) == "unquantized_gemv"
    assert platform.default_quantization(torch.float16) == "unquantized_gemv"
    assert platform.default_quantization(torch.float32) is None  # the exact reference
