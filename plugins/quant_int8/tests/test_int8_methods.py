"""The int8 methods through tessellm's conformance kit, their configs and their storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tessellm.testing import check_quantization_method
from tessellm_quant_int8.methods import Int8W8A8, Int8WeightOnly

METHODS = ["int8", "int8_weight_only"]


@pytest.mark.parametrize("quant_config", [None, {"quant_method": "int8"}], ids=["online", "int8"])
@pytest.mark.parametrize("name", METHODS)
def test_method_conforms_to_dense_linear(name, quant_config):
    """Online (dense checkpoint) and from int8 checkpoint tensors, in column, row and
    fused q/k/v and gate/up layers, in every dtype the CPU runs."""
    result = check_quantization_method(name, quant_config=quant_config)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    for part in ("bfloat16", "float32", "qkv", "merged", "row"):
        assert any(part in case for case in result.checked), part


@pytest.mark.parametrize("cls", [Int8W8A8, Int8WeightOnly])
def test_from_config_reads_the_int8_layout_and_refuses_the_rest(cls):
    assert not cls.from_config(None).checkpoint
    assert cls.from_config({"quant_method": "int8", "bits": 8, "group_size": -1}).checkpoint
    refused = [
        ({"quant_method": "fp8"}, "'fp8'"),
        ({"quant_method": "int8", "bits": 4}, "bits 4"),
        ({"quant_method": "int8", "group_size": 128}, "group_size 128"),
        ({"quant_method": "int8", "activation_scheme": "static"}, "activation_scheme"),
    ]
    for config, reason in refused:
        with pytest.raises(ValueError, match=reason):
            cls.from_config(config)


@pytest.mark.parametrize("cls", [Int8W8A8, Int8WeightOnly])
def test_online_quantization_keeps_no_dense_weight(cls):
    method = cls.from_config(None)
    layer = nn.Module()
    method.create_weights(layer, 64, 32, torch.bfloat16)
    dense = torch.randn(32, 64).bfloat16()
    layer.weight.data.copy_(dense)
    method.process_weights_after_loading(layer)
    stored = {name: (t.dtype, tuple(t.shape)) for name, t in layer.state_dict().items()}
    assert stored == {"weight": (torch.int8, (32, 64)), "weight_scale": (torch.float32, (32, 1))}
    tensors = method.__class__.from_config({"quant_method": "int8"}).checkpoint_tensors(dense)
    assert torch.equal(layer.weight, tensors["weight"])  # the reference quantizer's values
    assert torch.equal(layer.weight_scale, tensors["weight_scale"])
    method.process_weights_after_loading(layer)  # a second call leaves it as it is
    assert torch.equal(layer.weight, tensors["weight"])


def test_checkpoint_layers_register_the_stored_layout():
    method = Int8W8A8.from_config({"quant_method": "int8"})
    layer = nn.Module()
    method.create_weights(layer, 48, 16, torch.float32)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (16, 48)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (16, 1)
    # Per output row: placed with the rows in fused and column-split layers, whole in a
    # row-parallel split.
    assert layer.weight_scale.output_dim == 0 and layer.weight_scale.input_dim is None
    assert Int8W8A8.from_config(None).checkpoint_tensors(torch.ones(2, 2)).keys() == {"weight"}
