"""Dense copies of quantized GGUF matrices on the CPU (``runtime.DenseCopyBudget``): calls
with more than 16 rows multiply the exactly dequantized matrix, smaller ones the codes;
the copies stay within the model's budget."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_test_files import QT, random_blocks

from tessellm_gguf import runtime
from tessellm_gguf.blocks import decode
from tessellm_gguf.runtime import (
    DENSE_COPY_MAX_PACKED_ROWS,
    DenseCopyBudget,
    DequantSegment,
    GGUFLinearRuntime,
    dense_copy_dtype,
)

torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))

ROWS, COLS = 48, 256
CPU = torch.device("cpu")
LIMIT = DENSE_COPY_MAX_PACKED_ROWS


def _codes(qtype: int, seed: int = 0):
    raw = random_blocks(qtype, ROWS, COLS, np.random.default_rng(seed))
    return decode(torch.from_numpy(raw), qtype, COLS)


def _x(rows: int) -> torch.Tensor:
    return torch.randn(rows, COLS, generator=torch.Generator().manual_seed(rows)).bfloat16()


def _dense_product(x: torch.Tensor, codes) -> torch.Tensor:
    weight = codes.dequantize().to(dense_copy_dtype(torch.bfloat16))
    return F.linear(x.to(weight.dtype), weight).to(x.dtype)


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0], ids=lambda t: QT(t).name)
def test_int4_segment_switches_to_its_dense_copy_past_16_rows(qtype):
    codes = _codes(qtype)
    plain = GGUFLinearRuntime([codes], CPU, torch.bfloat16, DenseCopyBudget("off"))
    copied = GGUFLinearRuntime([codes], CPU, torch.bfloat16, DenseCopyBudget("on"))
    assert plain.kinds == copied.kinds == ["Int4KernelSegment"]
    assert plain.segments[0].dense is None
    assert copied.segments[0].dense.dtype == dense_copy_dtype(torch.bfloat16)
    for rows in (1, LIMIT):  # the codes: the same kernel call either way
        assert torch.equal(copied(_x(rows)), plain(_x(rows)))
    for rows in (LIMIT + 1, 40):
        x = _x(rows)
        assert torch.equal(copied(x), _dense_product(x, codes))
        # ...which is not what the kernel computes (bf16 scales, another summation).
        assert not torch.equal(copied(x), plain(x))
    batched = _x(3 * 8).view(3, 8, COLS)  # rows counted across leading dimensions
    assert torch.equal(
        copied(batched).view(24, ROWS), _dense_product(batched.view(24, COLS), codes)
    )


def test_dequantized_segment_uses_its_dense_copy_past_16_rows():
    codes = _codes(QT.Q6_K)  # scales over 16 inputs: not the int4 kernel's form
    layer = GGUFLinearRuntime([codes], CPU, torch.bfloat16, DenseCopyBudget("on"))
    assert layer.kinds == ["DequantSegment"]
    x = _x(LIMIT + 4)
    assert torch.equal(layer(x), _dense_product(x, codes))
    small = _x(2)
    assert torch.equal(layer(small), DequantSegment(codes)(small))


def test_budget_stops_at_the_first_layer_that_does_not_fit(monkeypatch):
    per_layer = ROWS * COLS * dense_copy_dtype(torch.bfloat16).itemsize
    monkeypatch.setattr(runtime, "DENSE_COPY_AUTO_BYTES", per_layer + per_layer // 2)
    budget = DenseCopyBudget("auto")
    first = GGUFLinearRuntime([_codes(QT.Q4_0)], CPU, torch.bfloat16, budget)
    second = GGUFLinearRuntime([_codes(QT.Q4_0)], CPU, torch.bfloat16, budget)
    assert first.segments[0].dense is not None and second.segments[0].dense is None
    assert budget.used == per_layer and budget.left == 0
    assert not budget.take(1)  # even a smaller layer: the copies end at one layer


def test_budget_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(runtime.DENSE_COPY_ENV, "off")
    assert DenseCopyBudget().left == 0
    monkeypatch.setenv(runtime.DENSE_COPY_ENV, "ON")
    assert DenseCopyBudget().take(1 << 40)
    monkeypatch.setenv(runtime.DENSE_COPY_ENV, "always")
    with pytest.raises(ValueError, match="TESSELLM_GGUF_CPU_DENSE must be auto, on or off"):
        DenseCopyBudget()


def test_layers_off_the_cpu_take_no_dense_copy():
    budget = DenseCopyBudget("on")
    codes = _codes(QT.Q4_0)
    layer = GGUFLinearRuntime([codes], torch.device("meta"), torch.bfloat16, budget)
    assert budget.used == 0 and all(getattr(s, "dense", None) is None for s in layer.segments)


def test_lm_head_uses_its_fp32_copy_past_16_rows():
    from tessellm_quant_int4.cpu_int4 import Int8GroupLogitsMatmul, pack_int8_groups

    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(64, COLS, generator=generator) * 0.05).bfloat16()
    packed = pack_int8_groups(weight, grid_only=False)
    copy = weight.float()
    head = Int8GroupLogitsMatmul(weight, packed, copy)
    without = Int8GroupLogitsMatmul(weight, packed)
    small, big = _x(LIMIT), _x(LIMIT + 1)
    assert torch.equal(head(small), without(small))
    expected = F.linear(big.float(), copy).bfloat16()
    # Where oneDNN is built in, the copy is kept in its blocked layout only (the head is
    # never traced): the same product up to fp32 summation order.
    assert head.blocked is not None and head.dense_copy is None
    torch.testing.assert_close(head(big), expected, rtol=0.01, atol=0.01)
    head.blocked = None
    assert head(big).shape == expected.shape  # no copy left: the weight's own GEMM
    plain = Int8GroupLogitsMatmul(weight, packed, None)
    plain.dense_copy = copy
    assert torch.equal(plain(big), expected)


@pytest.mark.parametrize(("low", "high", "dense"), [(1, 16, False), (17, 64, True)])
def test_exported_steps_follow_the_branch_of_their_batch_range(low, high, dense):
    """The CPU's compiled decode steps export one library per batch range (1-16, 17-64):
    each traces one side of the row threshold, with no guard left to fail."""
    layer = GGUFLinearRuntime([_codes(QT.Q4_1)], CPU, torch.bfloat16, DenseCopyBudget("on"))
    rows = torch.export.Dim("rows", min=low, max=high)
    program = torch.export.export(layer, (_x(low if low > 1 else 2),), dynamic_shapes=({0: rows},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    uses_kernel = any("int4pack" in t for t in targets)
    assert uses_kernel != dense
    x = _x(high)
    assert torch.equal(program.module()(x), layer(x))


def test_blocked_copies_take_what_the_budget_left_and_serve_eager_calls_only(monkeypatch):
    """``add_onednn_copies``: each dense copy also in oneDNN's blocked layout while the
    budget lasts; eager calls past 16 rows use it (the same product up to summation
    order); a trace calls ``blocked_linear`` on the plain copy, which finds the blocked one
    in this process and not in a pickled copy's (the blocked one can be neither exported
    nor pickled)."""
    import pickle

    from tessellm_gguf.runtime import add_onednn_copies

    per_copy = ROWS * COLS * dense_copy_dtype(torch.bfloat16).itemsize
    monkeypatch.setattr(runtime, "DENSE_COPY_AUTO_BYTES", 3 * per_copy)
    budget = DenseCopyBudget("auto")
    layers = torch.nn.ModuleList(
        GGUFLinearRuntime([_codes(QT.Q4_1, seed)], CPU, torch.bfloat16, budget) for seed in (1, 2)
    )
    assert add_onednn_copies(layers, budget) == 1  # two dense copies, room for one more
    first, second = (layer.segments[0] for layer in layers)
    assert first.onednn.weight is not None and second.onednn is None
    assert budget.left == 0

    x = _x(LIMIT + 7)
    calls = []
    blocked_linear = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or blocked_linear(*a)
    )
    blocked = layers[0](x)
    assert calls == [1]
    plain = _dense_product(x, _codes(QT.Q4_1, 1))
    torch.testing.assert_close(blocked, plain, rtol=0.01, atol=0.01)  # bf16 outputs
    assert torch.equal(
        layers[0](_x(LIMIT)),
        GGUFLinearRuntime([_codes(QT.Q4_1, 1)], CPU, torch.bfloat16, DenseCopyBudget("off"))(
            _x(LIMIT)
        ),
    )

    rows = torch.export.Dim("rows", min=LIMIT + 1, max=64)
    program = torch.export.export(layers[0], (x,), dynamic_shapes=({0: rows},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "tessellm_quant_int4.blocked_linear.default" in targets
    assert not any("mkldnn" in t for t in targets)
    assert torch.equal(program.module()(x), blocked)
    unblocked = torch.export.export(layers[1], (x,), dynamic_shapes=({0: rows},))
    assert not any("blocked_linear" in str(node.target) for node in unblocked.graph.nodes)

    copied = pickle.loads(pickle.dumps(layers[0]))
    assert copied.segments[0].onednn.weight is None
    assert torch.equal(copied(x), plain)


def test_blocked_linear_finds_a_live_weights_copy_only():
    from tessellm_quant_int4 import onednn_weight
    from tessellm_quant_int4.onednn_weight import OneDnnWeight

    weight = torch.randn(40, COLS, generator=torch.Generator().manual_seed(5))
    x = torch.randn(20, COLS, generator=torch.Generator().manual_seed(6))
    op = torch.ops.tessellm_quant_int4.blocked_linear
    assert torch.equal(op(x, weight), F.linear(x, weight))  # no copy: the plain product
    copy = OneDnnWeight(weight)
    assert torch.equal(op(x, weight), copy.linear(x))
    assert torch.equal(op(x, weight.clone()), F.linear(x, weight))  # another tensor's storage
    entries = len(onednn_weight._BLOCKED)
    del weight
    assert len(onednn_weight._BLOCKED) == entries - 1  # gone with the plain weight


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++")), reason="no C++ compiler")
def test_a_compiled_library_multiplies_through_this_process_blocked_copy(tmp_path, monkeypatch):
    """The CPU's decode libraries take the plain weight as an input and reach
    ``blocked_linear`` through torch's dispatcher: the copy it finds is this process's.
    Swapping the registered copy for one of twice the weight shows the library used it."""
    from tessellm_quant_int4 import onednn_weight
    from tessellm_quant_int4.onednn_weight import OneDnnWeight, dense_linear

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    weight = torch.randn(48, COLS, generator=torch.Generator().manual_seed(7))
    copy = OneDnnWeight(weight)

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.onednn = copy

        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return dense_linear(x, w, self.onednn)

    x = torch.randn(30, COLS, generator=torch.Generator().manual_seed(8))
    rows = torch.export.Dim("rows", min=LIMIT + 1, max=64)
    program = torch.export.export(Linear(), (x, weight), dynamic_shapes=({0: rows}, None))
    path = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "linear.pt2")
    )
    library = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(library(x, weight), copy.linear(x))
    key = onednn_weight._key(weight)
    monkeypatch.setitem(onednn_weight._BLOCKED, key, OneDnnWeight(2 * weight).weight)
    torch.testing.assert_close(library(x, weight), 2 * copy.linear(x))
