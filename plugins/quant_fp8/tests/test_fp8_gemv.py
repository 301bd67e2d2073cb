"""The batch-1 fp8 GEMV (Triton; without a GPU in its interpreter): the weight-only
product of one row with fp8 weights and per-channel scales, on the padded ``_scaled_mm``
layout, with and without bias, across step and tile edges."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined
pytest.importorskip("triton")

from tessellm_quant_fp8.fp8 import pad_for_scaled_mm, quantize_weight_per_channel
from tessellm_quant_fp8.fp8_gemv import fp8_gemv
from tessellm_triton_kernels.gemv import GemvConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, q, scale, bias):
    y = (x.double() @ q.double().T) * scale.double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize(
    ("n", "k", "config"),
    [
        (24, 40, None),  # narrow: one step of K's own width
        (37, 300, GemvConfig(block_n=4, block_k=128, num_warps=4)),  # ragged N and K
        (64, 512, GemvConfig(block_n=8, block_k=256, num_warps=4)),  # even
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_float64_product(n, k, config, with_bias):
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    q, scale = quantize_weight_per_channel(weight)
    q, scale = pad_for_scaled_mm(q, scale.reshape(-1))
    x = torch.randn(1, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    args = [t.to(DEVICE) if t is not None else None for t in (x, q, scale, bias)]
    y = fp8_gemv(args[0], args[1], args[2], n, args[3], config)
    assert y.shape == (1, n) and y.dtype == x.dtype
    expected = _reference(x, q[:n, :k].float(), scale[:n], bias)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-4)


def test_refuses_more_than_one_row_and_a_short_weight():
    q = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    scale = torch.ones(16)
    with pytest.raises(ValueError, match="one row"):
        fp8_gemv(torch.zeros(2, 16), q, scale, 16)
    with pytest.raises(ValueError, match="does not cover"):
        fp8_gemv(torch.zeros(1, 32), q, scale, 16)
