"""Linear layers of each scheme loaded from tensors the compressed-tensors library's
compressors wrote for random weights: plain, fused q/k/v and gate/up (one scale set per
checkpoint matrix), tensor-parallel slices; the loaded weights equal the independent
dequantization of ``quant_ct_checkpoints`` and the layers multiply by them."""

from __future__ import annotations

import pytest
import torch
from quant_ct_checkpoints import (
    dequantize_linear,
    library_tensors,
    quant_config_dict,
    scheme,
    static_int8_scheme,
)

from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tessellm_quant_compressed_tensors.method import CompressedTensors
from tessellm_quant_int4.int4_groups import cpu_kernel_fast

HIDDEN, HEAD = 256, 16
KINDS = ("column", "row", "merged", "qkv")
PACKED = [
    pytest.param(("W4A16", {"group_size": 32}), id="w4-g32"),
    pytest.param(("W4A16", {"group_size": 128}), id="w4-g128"),
    pytest.param(("W4A16_ASYM", {"group_size": 64}), id="w4-asym-g64"),
    pytest.param(("W4A16", {"strategy": "channel"}), id="w4-channel"),
    pytest.param(("W8A16", {"group_size": 32}), id="w8-g32"),
    pytest.param(("W8A16", {"group_size": 64, "symmetric": False}), id="w8-asym-g64"),
    pytest.param(("W8A16", {"strategy": "channel"}), id="w8-channel"),
]


def method_for(linear_scheme, fmt: str) -> CompressedTensors:
    return CompressedTensors.from_config(quant_config_dict(linear_scheme, fmt))


def make_layer(kind: str, method, rank: int = 0, tp: int = 1, in_features: int = HIDDEN):
    """``(layer, [(shard args, checkpoint rows)])`` of one linear kind."""
    ctx = ModelContext(torch.float32, torch.device("cpu"), None, method, ParallelInfo(rank, tp))
    if kind == "qkv":  # 8 query heads, 2 KV heads
        layer = QKVParallelLinear(in_features, HEAD, 8, 2, ctx)
        return layer, [(("q",), 8 * HEAD), (("k",), 2 * HEAD), (("v",), 2 * HEAD)]
    if kind == "merged":  # gate and up of unequal widths
        return MergedColumnParallelLinear(in_features, [96, 32], ctx), [((0,), 96), ((1,), 32)]
    cls = RowParallelLinear if kind == "row" else ColumnParallelLinear
    return cls(in_features, 64, ctx), [((), 64)]


def random_matrices(shards, seed: int = 0, in_features: int = HIDDEN) -> list[torch.Tensor]:
    """One matrix per shard, magnitudes differing, so a scale on the wrong shard shows."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(rows, in_features, generator=g) * (0.05 + 0.1 * i)
        for i, (_, rows) in enumerate(shards)
    ]


def load(layer, shards, stored: list[dict[str, torch.Tensor]]) -> None:
    params = dict(layer.named_parameters())
    for (shard, _), tensors in zip(shards, stored, strict=True):
        for name, tensor in tensors.items():
            layer.weight_loader(params[name], tensor.to(params[name].dtype), *shard)


def effective_packed_weight(method, layer) -> torch.Tensor:
    """The ``[N, K]`` weight the loaded (unprocessed) packed tensors give the layer."""
    q, zeros, scales = method.linear.unpacked(layer)
    per_input = q.shape[1] // scales.shape[1]
    return (q - zeros.repeat_interleave(per_input, 1)).float() * scales.repeat_interleave(
        per_input, 1
    )


def expected_path(linear_scheme, dtype: torch.dtype) -> str:
    """Where a packed layer runs on this CPU (see ``tessellm_quant_compressed_tensors.packed``)."""
    args = linear_scheme.weights
    if args.num_bits == 4:
        return "int4"
    if args.group_size is None and args.symmetric:  # per channel
        return "int8"
    return "int8_halves" if cpu_kernel_fast(dtype) else "int8_dequantize"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", PACKED)
def test_packed_layers_hold_and_multiply_by_the_dequantized_weights(case, kind):
    preset, weights = case
    linear_scheme = scheme(preset, **weights)
    method = method_for(linear_scheme, "pack-quantized")
    layer, shards = make_layer(kind, method)
    stored = [library_tensors(w, linear_scheme, "pack-quantized") for w in random_matrices(shards)]
    load(layer, shards, stored)
    expected = torch.cat([dequantize_linear(t, linear_scheme) for t in stored])
    assert torch.equal(effective_packed_weight(method, layer), expected)
    method.process_weights_after_loading(layer)
    assert not any(name.startswith("weight") for name, _ in layer.named_parameters())
    assert layer.ct_path == expected_path(linear_scheme, torch.float32)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "fmt", "weights"),
    [
        ("W4A16", "pack-quantized", {"group_size": 64}),
        ("W4A16_ASYM", "pack-quantized", {"group_size": 32}),
        ("W8A16", "pack-quantized", {"strategy": "channel"}),
        ("W8A8", "int-quantized", {}),
        ("FP8", "float-quantized", {}),
        ("FP8_DYNAMIC", "float-quantized", {}),
    ],
)
def test_checkpoint_tensors_are_the_library_compressors(preset, fmt, weights):
    from tessellm_quant_compressed_tensors.checkpoint import STATIC_INPUT_RANGE

    linear_scheme = scheme(preset, **weights)
    weight = torch.randn(48, HIDDEN, generator=torch.Generator().manual_seed(2)) * 0.1
    ours = method_for(linear_scheme, fmt).checkpoint_tensors(weight)
    theirs = library_tensors(weight, linear_scheme, fmt, input_amax=STATIC_INPUT_RANGE)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name].float(), theirs[name].float()), name


def test_a_partial_last_group_is_read_as_gptq_reads_it():
    """K = 96 in groups of 128 (the conformance kit has such a layer; llm-compressor
    refuses it): one partial group, the packed words cut at K."""
    linear_scheme = scheme("W4A16_ASYM", group_size=128)
    method = method_for(linear_scheme, "pack-quantized")
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    stored = method.checkpoint_tensors(weight)
    assert stored["weight_packed"].shape == (32, 12)
    assert stored["weight_scale"].shape == (32, 1)
    assert stored["weight_shape"].tolist() == [32, 96]
    dense = dequantize_linear(stored, linear_scheme)
    step = (
        weight.amax(1, keepdim=True).clamp(min=0) - weight.amin(1, keepdim=True).clamp(max=0)
    ) / 15
    assert bool(((dense - weight).abs() <= step / 2 + 1e-6).all())
    ctx = ModelContext(torch.float32, torch.device("cpu"), None, method, ParallelInfo())
    layer = ColumnParallelLinear(96, 32, ctx)
    load(layer, [((), 32)], [stored])
    method.process_weights_after_loading(layer)
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), x @ dense.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize(
    ("preset", "fmt", "weights"),
    [
        ("W4A16_ASYM", "pack-quantized", {"group_size": 32}),
        ("W8A16", "pack-quantized", {"strategy": "channel"}),
        ("W8A8", "int-quantized", {"strategy": "tensor"}),
    ],
)
def test_tensor_parallel_ranks_load_their_slices(preset, fmt, weights, kind):
    linear_scheme = scheme(preset, **weights)
    method = method_for(linear_scheme, fmt)
    layer, shards = make_layer(kind, method, rank=1, tp=2)
    (weight,) = random_matrices(shards)
    stored = library_tensors(weight, linear_scheme, fmt)
    load(layer, shards, [stored])
    method.process_weights_after_loading(layer)
    dense = dequantize_linear(stored, linear_scheme)
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(4))
    if kind == "row":  # rank 1's half of the inputs, all outputs (partial sums)
        x_here, expected = x[:, HIDDEN // 2 :], x[:, HIDDEN // 2 :] @ dense[:, HIDDEN // 2 :].t()
    else:  # rank 1's half of the outputs
        x_here, expected = x, x @ dense[32:].t()
    tol = 3e-2 if fmt == "int-quantized" else 1e-5  # per-token activation rounding
    torch.testing.assert_close(layer._matmul(x_here, None), expected, rtol=tol, atol=tol)


def test_a_weight_shape_of_another_layer_is_refused():
    linear_scheme = scheme("W4A16", group_size=32)
    method = method_for(linear_scheme, "pack-quantized")
    layer, shards = make_layer("column", method)
    stored = library_tensors(torch.randn(64, HIDDEN), linear_scheme, "pack-quantized")
    stored["weight_shape"] = torch.tensor([64, 2 * HIDDEN])
    with pytest.raises(ValueError, match="weight_shape"):
        load(layer, shards, [stored])


@pytest.mark.parametrize(
    ("preset", "fmt", "weights", "static"),
    [
        ("W8A8", "int-quantized", {}, False),
        ("W8A8", "int-quantized", {"strategy": "tensor"}, True),
        ("FP8_DYNAMIC", "float-quantized", {}, False),
        ("FP8", "float-quantized", {}, True),
    ],
)
def test_w8a8_fused_layers_hold_each_shards_scales(preset, fmt, weights, static):
    linear_scheme = scheme(preset, **weights)
    if static and fmt == "int-quantized":
        linear_scheme = static_int8_scheme(weights["strategy"])
    method = method_for(linear_scheme, fmt)
    layer, shards = make_layer("qkv", method)
    amaxes = (3.0, 5.0, 4.0)
    stored = [
        library_tensors(w, linear_scheme, fmt, input_amax=a)
        for w, a in zip(random_matrices(shards), amaxes, strict=True)
    ]
    load(layer, shards, stored)
    method.process_weights_after_loading(layer)
    expected = torch.cat([dequantize_linear(t, linear_scheme) for t in stored])
    held = layer.weight.float() * layer.weight_scale.reshape(-1, 1)
    assert torch.equal(held, expected)
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(5))
    y = layer(x)
    if static:  # one activation scale for the fused layer: the largest shard's
        largest = max(float(t["input_scale"]) for t in stored)
        assert float(layer.input_scale) == largest
    if fmt == "int-quantized":
        if static:  # independently: x rounded on the static scale, integer product
            s_in = float(layer.input_scale)
            xq = torch.clamp(torch.round(x / s_in), -128, 127)
            reference = (xq.double() @ layer.weight.double().t()) * s_in
            reference = reference * layer.weight_scale.double().reshape(1, -1)
            torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)
        error = (y - x @ expected.t()).norm() / (x @ expected.t()).norm()
        assert 1e-5 < float(error) < 0.03  # activations rounded to 8 bits
    else:  # the CPU runs fp8 weight-only
        torch.testing.assert_close(y, x @ expected.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(("W4A16_ASYM", {"group_size": 32}), id="w4-asym-g32"),
        pytest.param(("W8A16", {"group_size": 64, "symmetric": False}), id="w8-asym-g64"),
    ],
)
def test_bf16_layers_run_on_torchs_int4_kernel(case):
    """In bf16 the int4 runtime takes torch's int4 CPU kernel, 8-bit weights as two
    nibble halves (in fp32 on x86 both dequantize per call, covered above)."""
    preset, weights = case
    linear_scheme = scheme(preset, **weights)
    method = method_for(linear_scheme, "pack-quantized")
    ctx = ModelContext(torch.bfloat16, torch.device("cpu"), None, method, ParallelInfo())
    layer = MergedColumnParallelLinear(HIDDEN, [96, 32], ctx)
    shards = [((0,), 96), ((1,), 32)]
    stored = [library_tensors(w, linear_scheme, "pack-quantized") for w in random_matrices(shards)]
    load(layer, shards, stored)
    method.process_weights_after_loading(layer)
    assert layer.ct_path == expected_path(linear_scheme, torch.bfloat16)
    assert layer.int4_path == "cpu"
    expected = torch.cat([dequantize_linear(t, linear_scheme) for t in stored])
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(6)).bfloat16()
    reference = x.float() @ expected.t()
    error = (layer(x).float() - reference).norm() / reference.norm()
    assert float(error) < 1e-2  # bf16 rounding of activations, scales and sums
