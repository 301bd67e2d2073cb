"""fp8 linear layers: checkpoint tensors written with plain torch load (per tensor or per
channel, fused q/k/v and gate/up, tensor-parallel slices, static input scales) into weights
that dequantize exactly to an independent dequantization; configs and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quant_fp8_checkpoints import dequantized, fp8_per_channel, fp8_per_tensor

from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tessellm_quant_fp8.method import Fp8Method

HIDDEN, HEAD = 64, 16
STATIC = {"quant_method": "fp8", "activation_scheme": "static"}
DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def make_layer(kind: str, method: Fp8Method, rank: int = 0, tp: int = 1, bias: bool = False):
    """``(layer, [(shard args, full checkpoint rows)])`` of one linear kind."""
    ctx = ModelContext(torch.float32, torch.device("cpu"), None, method, ParallelInfo(rank, tp))
    if kind == "qkv":  # 4 query heads, 2 KV heads
        layer = QKVParallelLinear(HIDDEN, HEAD, 4, 2, ctx, bias=bias)
        return layer, [(("q",), 4 * HEAD), (("k",), 2 * HEAD), (("v",), 2 * HEAD)]
    if kind == "merged":  # gate and up of unequal widths
        return MergedColumnParallelLinear(HIDDEN, [96, 32], ctx, bias=bias), [
            ((0,), 96),
            ((1,), 32),
        ]
    if kind == "row":
        return RowParallelLinear(HIDDEN, 48, ctx, bias=bias), [((), 48)]
    return ColumnParallelLinear(HIDDEN, 48, ctx, bias=bias), [((), 48)]


def checkpoint_matrices(rows_list, per_channel: bool, seed: int = 0):
    """One random matrix per shard, each quantized with its own scale(s) by plain torch;
    the matrices' magnitudes differ, so a scale placed on the wrong shard shows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, rows in enumerate(rows_list):
        w = torch.randn(rows, HIDDEN, generator=g) * (0.5 + i)
        out.append(fp8_per_channel(w) if per_channel else fp8_per_tensor(w))
    return out


def load(layer, shards, matrices, input_scales=None):
    for i, ((shard, _rows), (q, scale)) in enumerate(zip(shards, matrices, strict=True)):
        layer.weight_loader(layer.weight, q, *shard)
        layer.weight_loader(layer.weight_scale, scale, *shard)
        if input_scales is not None:
            layer.weight_loader(layer.input_scale, torch.tensor(input_scales[i]), *shard)
    layer.quant.process_weights_after_loading(layer)


@pytest.mark.parametrize("kind", ["column", "row", "merged", "qkv"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("config", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_checkpoint_loads_to_its_independent_dequantization(kind, per_channel, config):
    method = Fp8Method.from_config(config)
    layer, shards = make_layer(kind, method)
    matrices = checkpoint_matrices([rows for _, rows in shards], per_channel)
    input_scales = [0.02 * (i + 1) for i in range(len(shards))] if config is STATIC else None
    load(layer, shards, matrices, input_scales)

    expected = torch.cat([dequantized(q, s.reshape(-1, 1)) for q, s in matrices])
    stored_q = torch.cat([q for q, _ in matrices])
    # The fp8 bytes as the checkpoint holds them, in order of the fused shards.
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), stored_q.view(torch.uint8))
    got = dequantized(layer.weight, layer.weight_scale.reshape(-1, 1))
    assert torch.equal(got, expected)  # exact: per-shard scales kept, nothing requantized
    if config is STATIC:  # one activation feeds every shard: the largest scale
        assert float(layer.input_scale) == pytest.approx(max(input_scales))
    else:
        assert not hasattr(layer, "input_scale")
    x = torch.randn(3, 5, HIDDEN)
    y = layer(x)  # the CPU's weight-only reference path
    assert y.shape == (3, 5, expected.shape[0])
    torch.testing.assert_close(y, F.linear(x, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["column", "qkv", "row"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_tensor_parallel_rank_loads_its_slice(kind, per_channel):
    layer, shards = make_layer(kind, Fp8Method.from_config(DYNAMIC), rank=1, tp=2)
    matrices = checkpoint_matrices([rows for _, rows in shards], per_channel, seed=1)
    load(layer, shards, matrices)
    parts = []
    for q, s in matrices:
        full = dequantized(q, s.reshape(-1, 1))
        if kind == "row":  # rank 1 holds the second half of the inputs, every output
            parts.append(full[:, HIDDEN // 2 :])
        else:  # rank 1 holds the second half of each shard's outputs
            parts.append(full[full.shape[0] // 2 :])
    expected = torch.cat(parts)
    got = dequantized(layer.weight, layer.weight_scale.reshape(-1, 1))
    assert torch.equal(got, expected)


def test_a_shard_the_checkpoint_lacks_is_refused_after_loading():
    layer, shards = make_layer("qkv", Fp8Method.from_config(DYNAMIC))
    matrices = checkpoint_matrices([rows for _, rows in shards], per_channel=False)
    for (shard, _), (q, scale) in zip(shards[:2], matrices[:2], strict=True):  # no "v"
        layer.weight_loader(layer.weight, q, *shard)
        layer.weight_loader(layer.weight_scale, scale, *shard)
    with pytest.raises(ValueError, match=r"weight_scale .* missing for 32 of 128"):
        layer.quant.process_weights_after_loading(layer)


def test_online_quantization_keeps_fp8_only_and_matches_checkpoint_tensors():
    method = Fp8Method.from_config(None)
    layer, _ = make_layer("merged", method, bias=True)
    dense = torch.randn(128, HIDDEN)
    assert layer.weight.dtype == torch.float32
    layer.weight_loader(layer.weight, dense[:96], 0)
    layer.weight_loader(layer.weight, dense[96:], 1)
    method.process_weights_after_loading(layer)
    dense_params = [n for n, p in layer.named_parameters() if p.numel() > 128]
    assert dense_params == ["weight"] and layer.weight.dtype == torch.float8_e4m3fn
    # What an fp8 checkpoint of this weight would store (the format's reference packer).
    stored = Fp8Method.from_config(DYNAMIC).checkpoint_tensors(dense)
    q, scale = fp8_per_channel(dense)  # the independent plain-torch quantizer
    assert torch.equal(stored["weight"].view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(stored["weight_scale"], scale, rtol=0, atol=0)
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    # fp8 keeps 3 mantissa bits: each weight within 1/16 of itself (or of the subnormal step).
    deq = dequantized(layer.weight, layer.weight_scale.reshape(-1, 1))
    step = torch.maximum(dense.abs() / 16, scale * 2.0**-9)
    assert bool(((deq - dense).abs() <= step + 1e-7).all())
    assert Fp8Method.from_config(None).checkpoint_tensors(dense)["weight"] is dense


def test_config_choices_and_refusals():
    assert not Fp8Method.from_config(None).checkpoint
    static = Fp8Method.from_config({"quant_method": "fp8", "activation_scheme": "static"})
    assert static.checkpoint and static.activation_scheme == "static"
    lm_head_only = {"quant_method": "fp8", "ignored_layers": ["lm_head"]}
    assert Fp8Method.from_config(lm_head_only).activation_scheme == "dynamic"
    refused = {
        "block-wise": ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
        "scheme": ({"quant_method": "fp8", "activation_scheme": "tensor"}, "activation_scheme"),
        "e5m2": ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
        "other": ({"quant_method": "gptq"}, "gptq"),
        "dense layers": (
            {"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj"]},
            "unquantized linear layers",
        ),
    }
    for config, words in refused.values():
        with pytest.raises(ValueError, match=words):
            Fp8Method.from_config(config)


def test_validate_reads_the_declared_capabilities():
    method = Fp8Method.from_config(DYNAMIC)
    assert method.validate("cpu", torch.float32) == []
    assert method.validate("cuda", torch.bfloat16, (9, 0)) == []
    assert method.validate("cuda", torch.bfloat16, (8, 9)) == []
    (reason,) = method.validate("cuda", torch.bfloat16, (8, 0))
    assert "8.9" in reason
    assert method.capabilities.checkpoint_formats == ("fp8",)
