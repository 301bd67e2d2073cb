"""GPTQ and AWQ checkpoints packed by the tests' own loops load to exactly the weights an
independent dequantization gives, and multiply by them on the CPU paths (torch's int4
kernel, dequantize-per-call) in fp32 to fp32 accuracy; Triton's are in test_int4_triton."""

from __future__ import annotations

import pytest
import torch
from quant_int4_reference import (
    awq_checkpoint,
    dequantize,
    gptq_checkpoint,
    random_quantized,
    unpack_awq,
    unpack_gptq,
)

from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear
from tessellm_quant_int4 import int4_groups
from tessellm_quant_int4.gptq_awq import AWQ, GPTQ

CPU_PATHS = ["cpu", "dequantize"]


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request, monkeypatch):
    """Each CPU path in fp32 (the int4 kernel is slow but exact there)."""
    monkeypatch.setattr(int4_groups, "cpu_kernel_fast", lambda dtype: request.param == "cpu")
    return request.param


def load_layer(method, stored, in_features, out_features, dtype=torch.float32, row=False):
    ctx = ModelContext(dtype, torch.device("cpu"), None, method, ParallelInfo())
    cls = RowParallelLinear if row else ColumnParallelLinear
    layer = cls(in_features, out_features, ctx)
    params = dict(layer.named_parameters())
    assert set(stored) == set(params)
    for name, tensor in stored.items():
        layer.weight_loader(params[name], tensor.to(params[name].dtype))
    return layer


def check_product(layer, dense, dtype=torch.float32, tol=1e-5):
    g = torch.Generator().manual_seed(3)
    for rows in (1, 7):
        x = torch.randn(rows, dense.shape[1], generator=g).to(dtype)
        y = layer(x)
        ref = x.double() @ dense.double().t()
        err = float((y.double() - ref).norm() / ref.norm())
        assert y.dtype == dtype and y.shape == ref.shape
        assert err < tol, f"{layer.int4_path}: relative error {err:.3g} at {rows} rows"


GPTQ_CASES = [
    # (group_size, act_order, sym, K, N)
    (32, False, True, 128, 32),
    (64, True, False, 128, 48),
    (128, True, True, 256, 32),
    (128, False, False, 96, 16),  # one ragged group: K is not a whole 128
    (-1, False, False, 96, 32),
    (-1, True, True, 64, 32),
]


@pytest.mark.parametrize(("group_size", "act_order", "sym", "k", "n"), GPTQ_CASES)
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_loads_the_independent_dequantization(group_size, act_order, sym, k, n, v2, cpu_path):
    parts = random_quantized(k, n, group_size, torch.Generator().manual_seed(k + n), act_order, sym)
    stored = gptq_checkpoint(parts, v2=v2)
    config = {"bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym}
    config["checkpoint_format"] = "gptq_v2" if v2 else "gptq"
    method = GPTQ.from_config(config)
    layer = load_layer(method, stored, k, n)
    dense = dequantize(parts)
    assert torch.equal(method.unpack(layer).dense(), dense)
    method.process_weights_after_loading(layer)
    assert layer.int4_path == cpu_path
    assert not hasattr(layer, "qweight")  # the checkpoint tensors are dropped
    check_product(layer, dense)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_loads_the_independent_dequantization(group_size, cpu_path):
    k, n = 256, 48
    parts = random_quantized(k, n, group_size, torch.Generator().manual_seed(group_size))
    method = AWQ.from_config({"bits": 4, "group_size": group_size, "zero_point": True})
    layer = load_layer(method, awq_checkpoint(parts), k, n)
    dense = dequantize(parts)
    assert torch.equal(method.unpack(layer).dense(), dense)
    method.process_weights_after_loading(layer)
    assert layer.int4_path == cpu_path
    check_product(layer, dense)


def test_zero_point_zero_round_trips_through_v1s_minus_one():
    parts = random_quantized(64, 16, 32, torch.Generator().manual_seed(5))
    parts["zeros"][0, :8] = 0  # stored as 15 (v1's -1 in 4 bits)
    stored = gptq_checkpoint(parts)
    assert int(stored["qzeros"][0, 0]) == -1  # eight nibbles of 15
    method = GPTQ.from_config({"group_size": 32, "sym": False})
    assert torch.equal(method.unpack(load_layer(method, stored, 64, 16)).dense(), dequantize(parts))


def test_shapes_the_cpu_kernel_cannot_take_are_dequantized_per_call(monkeypatch):
    monkeypatch.setattr(int4_groups, "cpu_kernel_fast", lambda dtype: True)
    k, n = 64, 24  # N not a multiple of 16
    parts = random_quantized(k, n, 32, torch.Generator().manual_seed(9), act_order=True)
    method = GPTQ.from_config({"group_size": 32, "desc_act": True, "sym": False})
    layer = load_layer(method, gptq_checkpoint(parts), k, n)
    method.process_weights_after_loading(layer)
    assert layer.int4_path == "dequantize"
    check_product(layer, dequantize(parts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_within_rounding(dtype):
    """bf16 on the int4 kernel (vectorized on x86), fp16 as the platform allows."""
    parts = random_quantized(128, 32, 64, torch.Generator().manual_seed(2), act_order=True)
    method = GPTQ.from_config({"group_size": 64, "desc_act": True, "sym": False})
    layer = load_layer(method, gptq_checkpoint(parts), 128, 32, dtype=dtype)
    method.process_weights_after_loading(layer)
    assert layer.int4_path == ("cpu" if int4_groups.cpu_kernel_fast(dtype) else "dequantize")
    check_product(layer, dequantize(parts), dtype, tol=2e-2)


def test_row_parallel_layer_loads_the_same(cpu_path):
    parts = random_quantized(128, 32, 32, torch.Generator().manual_seed(4))
    method = AWQ.from_config({"group_size": 32})
    layer = load_layer(method, awq_checkpoint(parts), 128, 32, row=True)
    method.process_weights_after_loading(layer)
    check_product(layer, dequantize(parts))


def test_reference_packers_write_what_the_tests_loops_read():
    """checkpoint_tensors (the conformance kit's checkpoints) in the layout the tests'
    loops read, within half a step of the weight."""
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(11)) * 0.05
    for config in ({"group_size": 32, "sym": False}, {"group_size": 32, "desc_act": True}):
        method = GPTQ.from_config(config)
        stored = method.checkpoint_tensors(weight)
        parts = unpack_gptq(stored)
        g_idx = parts["g_idx"]
        assert torch.equal(g_idx.sort().values, torch.arange(128, dtype=torch.int32) // 32)
        assert bool((g_idx != g_idx.sort().values).any()) == method.desc_act
        if method.sym:  # every stored zero is 7: z = 8 less v1's one
            assert bool((stored["qzeros"] == 0x77777777).all())
        step = float(parts["scales"].float().amax())
        assert float((dequantize(parts) - weight).abs().max()) <= 0.5 * step + 1e-6
    parts = unpack_awq(AWQ.from_config({"group_size": 64}).checkpoint_tensors(weight), 64)
    step = float(parts["scales"].float().amax())
    assert float((dequantize(parts) - weight).abs().max()) <= 0.5 * step + 1e-6


@pytest.mark.parametrize(
    ("cls", "config", "message"),
    [
        (GPTQ, {"bits": 8}, "8-bit"),
        (GPTQ, {"group_size": 16}, "group_size 16"),
        (GPTQ, {"checkpoint_format": "marlin"}, "checkpoint_format"),
        (GPTQ, {"lm_head": True}, "lm_head"),
        (AWQ, {"w_bit": 3}, "3-bit"),
        (AWQ, {"group_size": -1}, "group_size -1"),
        (AWQ, {"zero_point": False}, "zero_point"),
        (AWQ, {"version": "gemv"}, "gemv"),
    ],
)
def test_unsupported_configs_are_refused_with_the_reason(cls, config, message):
    with pytest.raises(ValueError, match=message):
        cls.from_config(config)


def test_from_config_reads_the_checkpoints_options():
    gptq = GPTQ.from_config({"bits": 4, "group_size": 64, "desc_act": True, "sym": False})
    assert (gptq.group_size, gptq.desc_act, gptq.sym, gptq.v2) == (64, True, False, False)
    awq = AWQ.from_config({"w_bit": 4, "q_group_size": 32, "zero_point": True})
    assert awq.group_size == 32
    with pytest.raises(ValueError, match="multiples of 8"):
        load_layer(gptq, {}, 64, 20)
