"""The Triton 4-bit dequant-GEMM and one-row GEMV against the tests' own dequantization.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
before any kernel is defined) on tiny shapes in fp32; with one, also in bf16/fp16 at a
Llama-3-8B projection's shape.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from quant_int4_reference import dequantize, gptq_checkpoint, random_quantized

from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.linear import ColumnParallelLinear
from tessellm_quant_int4 import int4_groups
from tessellm_quant_int4.formats import pack_along_rows
from tessellm_quant_int4.gptq_awq import GPTQ
from tessellm_quant_int4.triton_int4 import int4_group_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def kernel_inputs(parts, dtype=torch.float32):
    """The kernels' layout of plain (not act-order) groups."""
    return (
        pack_along_rows(parts["q"]).to(DEVICE),
        parts["scales"].to(DEVICE),
        parts["zeros"].to(torch.uint8).to(DEVICE),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize(
    ("rows", "k", "n", "group_size"),
    [
        (1, 128, 64, 32),  # GEMV, groups smaller than a step
        (1, 384, 48, 128),  # GEMV, a group per step, a ragged last step
        (1, 96, 40, 128),  # GEMV, one ragged group, ragged outputs
        (5, 128, 48, 64),  # GEMM, fewer rows than a tile
        (7, 128, 32, 32),  # GEMM, 32-input steps
        (40, 256, 80, 128),  # GEMM, several row and K tiles, ragged outputs
        (3, 96, 32, -1),  # GEMM, one group over all inputs
    ],
)
def test_kernels_match_the_dequantized_product(rows, k, n, group_size):
    gen = torch.Generator().manual_seed(rows * k + n)
    parts = random_quantized(k, n, group_size, gen)
    x = torch.randn(rows, k, generator=gen)
    ref = x.double() @ dequantize(parts).double().t()
    size = k if group_size == -1 else group_size
    out = int4_group_matmul(x.to(DEVICE), *kernel_inputs(parts), size)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


def test_fp32_scales_are_read_as_well():
    gen = torch.Generator().manual_seed(1)
    parts = random_quantized(64, 32, 32, gen)
    qweight, scales, zeros = kernel_inputs(parts)
    x = torch.randn(2, 64, generator=gen)
    out = int4_group_matmul(x.to(DEVICE), qweight, scales.float(), zeros, 32)
    assert rel_err(out, x.double() @ dequantize(parts).double().t()) < 1e-5


def test_layers_on_the_triton_path_permute_act_order_inputs(monkeypatch):
    monkeypatch.setattr(int4_groups, "_triton_ready", lambda device: True)
    monkeypatch.setattr(int4_groups, "pack_quantized_groups", lambda *args: None)
    gen = torch.Generator().manual_seed(8)
    parts = random_quantized(128, 48, 32, gen, act_order=True)
    method = GPTQ.from_config({"group_size": 32, "desc_act": True, "sym": False})
    # On the device Triton runs on (the CPU only under its interpreter).
    ctx = ModelContext(torch.float32, torch.device(DEVICE), None, method, ParallelInfo())
    with torch.device(DEVICE):
        layer = ColumnParallelLinear(128, 48, ctx)
    for name, tensor in gptq_checkpoint(parts).items():
        param = getattr(layer, name)
        layer.weight_loader(param, tensor.to(param.dtype).to(param.device))
    method.process_weights_after_loading(layer)
    assert layer.int4_path == "triton" and layer.int4_perm is not None
    assert layer.int4_scales.dtype == torch.float16 and layer.int4_zeros.dtype == torch.uint8
    dense = dequantize(parts).double()
    for rows in (1, 6):
        x = torch.randn(rows, 128, generator=gen)
        assert rel_err(layer(x.to(DEVICE)), x.double() @ dense.t()) < 1e-5


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_llama_shapes_on_the_gpu(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    k, n = 4096, 6144  # Llama-3-8B's fused q/k/v
    parts = random_quantized(k, n, 128, gen)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    ref = x.double() @ dequantize(parts).double().t()
    out = int4_group_matmul(x.to(DEVICE), *kernel_inputs(parts), 128)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 1e-2
