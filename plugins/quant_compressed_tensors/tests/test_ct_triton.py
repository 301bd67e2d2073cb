"""Packed layers on the CUDA path: ``tessellm_quant_int4``'s Triton dequant-GEMM and
one-row GEMV, 8-bit weights as two nibble halves over a doubled K.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined) on CPU tensors, the layers told that Triton is ready; with one, on
the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from quant_ct_checkpoints import dequantize_linear, library_tensors, quant_config_dict, scheme

from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.linear import MergedColumnParallelLinear
from tessellm_quant_compressed_tensors import packed
from tessellm_quant_compressed_tensors.method import CompressedTensors
from tessellm_quant_int4 import int4_groups

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("preset", "weights", "path"),
    [
        ("W4A16_ASYM", {"group_size": 32}, "int4"),
        ("W4A16", {"strategy": "channel"}, "int4"),
        ("W8A16", {"group_size": 32}, "int8_halves"),
        ("W8A16", {"group_size": 64, "symmetric": False}, "int8_halves"),
    ],
)
def test_packed_layers_run_the_triton_kernels(monkeypatch, preset, weights, path):
    if DEVICE.type == "cpu":  # the interpreter on CPU tensors, as the GPU would run
        monkeypatch.setattr(int4_groups, "_triton_ready", lambda device: True)
        monkeypatch.setattr(int4_groups, "cpu_kernel_fast", lambda dtype: False)
        monkeypatch.setattr(packed, "cpu_kernel_fast", lambda dtype: True)
    linear_scheme = scheme(preset, **weights)
    method = CompressedTensors.from_config(quant_config_dict(linear_scheme, "pack-quantized"))
    ctx = ModelContext(torch.float32, DEVICE, None, method, ParallelInfo())
    with torch.device(DEVICE):
        layer = MergedColumnParallelLinear(128, [32, 16], ctx)
    gen = torch.Generator().manual_seed(7)
    stored = [
        library_tensors(
            torch.randn(rows, 128, generator=gen) * 0.1, linear_scheme, "pack-quantized"
        )
        for rows in (32, 16)
    ]
    for shard, tensors in enumerate(stored):
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            layer.weight_loader(param, tensor.to(param.dtype).to(DEVICE), shard)
    method.process_weights_after_loading(layer)
    assert layer.ct_path == path and layer.int4_path == "triton"
    dense = torch.cat([dequantize_linear(t, linear_scheme) for t in stored]).double()
    for rows in (1, 6):  # the GEMV, then the GEMM
        x = torch.randn(rows, 128, generator=gen)
        out = layer(x.to(DEVICE)).double().cpu()
        reference = x.double() @ dense.t()
        assert float((out - reference).norm() / reference.norm()) < 1e-5
