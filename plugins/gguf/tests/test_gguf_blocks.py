"""GGUF blocks decoded and multiplied on the CPU, against the ``gguf`` package's numpy
dequantization.

Decoding is exact (the same fp32 values). The CPU runtime forms: the per-call
dequantize path is exact before the matmul (fp32: within fp32 summation-order error of
``x @ W.T``); the int4 kernel path in bf16 rounds the activations and group scales to
bf16 (relative error of a row within 1e-2); forced to fp32 it checks the 4-bit and
two-halves repacking to fp32 rounding (1e-5).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import dequantize, quantize
from gguf_test_files import QT, random_blocks

from tessellm_gguf import runtime
from tessellm_gguf.blocks import KEPT_TYPES, decode
from tessellm_gguf.runtime import DequantSegment, GGUFLinearRuntime, Int4KernelSegment

torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))

TYPES = sorted(KEPT_TYPES)
SIMPLE_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]  # gguf.quants quantizes these
ROWS, COLS = 48, 512
CPU = torch.device("cpu")


def _name(qtype: int) -> str:
    return QT(qtype).name


def _reference(raw: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, QT(qtype)).copy())


def _row_error(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    ref = x.double() @ weight.double().T
    return float(((y.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_decode_equals_gguf_dequantize(qtype):
    raw = random_blocks(qtype, ROWS, COLS, np.random.default_rng(qtype))
    codes = decode(torch.from_numpy(raw), qtype, COLS)
    assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) < 2**codes.bits
    assert torch.equal(codes.dequantize(), _reference(raw, qtype))


@pytest.mark.parametrize("qtype", SIMPLE_TYPES, ids=_name)
def test_decode_of_gguf_quantized_weights(qtype):
    weight = np.random.default_rng(1).normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
    raw = quantize(weight, QT(qtype))
    decoded = decode(torch.from_numpy(raw), qtype, COLS).dequantize()
    assert torch.equal(decoded, _reference(raw, qtype))
    # And it is the weight, to the type's precision (a wrong layout would be ~100%).
    err = (decoded - torch.from_numpy(weight)).norm() / np.linalg.norm(weight)
    assert err < (0.1 if QT(qtype) in (QT.Q4_0, QT.Q4_1) else 0.05)


def test_decode_refuses_wrong_row_bytes():
    raw = random_blocks(QT.Q4_0, 4, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="take 72 bytes, the checkpoint has 36"):
        decode(torch.from_numpy(raw), QT.Q4_0, 128)


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
@pytest.mark.parametrize("batch", [1, 7, 40])
def test_cpu_runtime_fp32_is_exact_dequantize(qtype, batch):
    raw = random_blocks(qtype, ROWS, COLS, np.random.default_rng(qtype))
    layer = GGUFLinearRuntime([decode(torch.from_numpy(raw), qtype, COLS)], CPU, torch.float32)
    assert layer.kinds == ["DequantSegment"]
    x = torch.randn(batch, COLS, generator=torch.Generator().manual_seed(batch))
    assert _row_error(layer(x), x, _reference(raw, qtype)) < 1e-6


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
@pytest.mark.parametrize("batch", [1, 40])
def test_cpu_runtime_bf16(qtype, batch):
    raw = random_blocks(qtype, ROWS, COLS, np.random.default_rng(qtype))
    layer = GGUFLinearRuntime([decode(torch.from_numpy(raw), qtype, COLS)], CPU, torch.bfloat16)
    # Q6_K's 16-input scales do not fit the kernel's 32-input groups.
    expected = "DequantSegment" if QT(qtype) == QT.Q6_K else "Int4KernelSegment"
    assert layer.kinds == [expected]
    x = torch.randn(batch, COLS, generator=torch.Generator().manual_seed(batch)).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, ROWS)
    assert _row_error(y, x, _reference(raw, qtype)) < 1e-2


@pytest.mark.parametrize("qtype", [t for t in TYPES if QT(t) != QT.Q6_K], ids=_name)
def test_int4_kernel_repacking_in_fp32(qtype, monkeypatch):
    """The kernel form itself, without bf16 rounding: one half for 4-bit codes, two for
    5- and 8-bit codes."""
    monkeypatch.setattr(runtime, "INT4_KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    raw = random_blocks(qtype, ROWS, COLS, np.random.default_rng(qtype))
    segment = Int4KernelSegment(decode(torch.from_numpy(raw), qtype, COLS), torch.float32)
    assert segment.halves == (1 if QT(qtype) in (QT.Q4_0, QT.Q4_1, QT.Q4_K) else 2)
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(0))
    assert _row_error(segment(x), x, _reference(raw, qtype)) < 1e-5


def test_dequant_segment_in_chunks_of_rows(monkeypatch):
    monkeypatch.setattr(runtime, "DEQUANT_CHUNK_ELEMENTS", 5 * COLS)  # 5 rows a chunk
    raw = random_blocks(QT.Q6_K, ROWS, COLS, np.random.default_rng(0))
    segment = DequantSegment(decode(torch.from_numpy(raw), QT.Q6_K, COLS))
    assert segment.chunk_rows == 5
    x = torch.randn(2, 4, COLS, generator=torch.Generator().manual_seed(0))
    y = segment(x)
    assert y.shape == (2, 4, ROWS)
    assert _row_error(y.view(8, ROWS), x.view(8, COLS), _reference(raw, QT.Q6_K)) < 1e-6


def test_mixed_matrices_share_segments_by_kind():
    """q, k (Q4_K) merge into one int4 segment; v (Q6_K) and a dense F16 matrix follow in
    their own; the output is in checkpoint order."""
    rng = np.random.default_rng(5)
    raws = [(QT.Q4_K, random_blocks(QT.Q4_K, 32, COLS, rng)) for _ in range(2)]
    raws.append((QT.Q6_K, random_blocks(QT.Q6_K, 16, COLS, rng)))
    parts = [decode(torch.from_numpy(r), t, COLS) for t, r in raws]
    dense = torch.randn(16, COLS, generator=torch.Generator().manual_seed(1)) * 0.02
    layer = GGUFLinearRuntime([*parts, dense.half()], CPU, torch.bfloat16)
    assert layer.kinds == ["Int4KernelSegment", "DequantSegment", "DenseSegment"]
    weight = torch.cat([_reference(r, t) for t, r in raws] + [dense.half().float()])
    x = torch.randn(2, COLS, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert _row_error(layer(x), x, weight) < 1e-2


def test_rows_the_kernel_cannot_take_are_dequantized_per_call():
    raw = random_blocks(QT.Q4_0, 24, COLS, np.random.default_rng(0))  # 24: not 16k rows
    layer = GGUFLinearRuntime([decode(torch.from_numpy(raw), QT.Q4_0, COLS)], CPU, torch.bfloat16)
    assert layer.kinds == ["DequantSegment"]
