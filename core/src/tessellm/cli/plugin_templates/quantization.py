"""Template of a quantization-method plugin: weight-only int8, one scale per output channel."""

from __future__ import annotations

DESCRIPTION = "Quantization method $name (weight-only int8)"
IMPL_MODULE = "method"
IMPL_SUMMARY = (
    "`$class_name`, weight-only int8: the checkpoint's dense weights are rounded after "
    "loading to int8 with one scale per output channel (a quarter of fp32's memory)."
)
TEST_SUMMARY = (
    "the conformance check against a dense linear layer (`check_quantization_method`), "
    "what the method stores, and a generation with the engine using it."
)
USAGE = """\
Use it: `LLM(model, quantization="$name")`. The method is lossy: greedy tokens may differ
from the unquantized model's, so the engine never picks it unless asked.
"""

PLUGIN_IMPORTS = """\
from tessellm import hookimpl
"""

PLUGIN = """\


@hookimpl
def register_quantization_methods(register):
    register(
        "$name",
        "$package.method:$class_name",
    )
"""

IMPL = '''\
"""Weight-only int8 with one scale per output channel.

Linear layers are created with a dense ``weight`` that the checkpoint loader fills (and
shards across tensor-parallel ranks) as usual; ``process_weights_after_loading`` then
replaces it with ``qweight`` (int8, ``[out, in]``) and ``weight_scale`` (``[out]``) such
that ``weight ~= qweight * weight_scale[:, None]``. Since the scale is constant along each
output row, ``x @ weight.T == (x @ qweight.T) * weight_scale``: the matmul runs on the
int8 values (cast to the activation dtype) and the scale is applied to its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tessellm.interfaces.quantization import QuantizationMethod
from torch import nn

QMAX = 127  # symmetric: -127..127, so that -w and w round alike


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight int8 [out, in], scale float32 [out])`` of a dense ``[out, in]`` weight."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows
    qweight = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return qweight, scale


class $class_name(QuantizationMethod):
    name = "$name"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        # Checkpoints hold dense weights: the loaders write them here first.
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, scale = quantize_per_channel(layer.weight.data)
        layer.register_buffer("qweight", qweight, persistent=False)
        layer.register_buffer("weight_scale", scale, persistent=False)
        del layer.weight  # the dense copy is what quantizing saves

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, layer.qweight.to(x.dtype)) * layer.weight_scale.to(x.dtype)
        return out + bias if bias is not None else out
'''

TEST = '''\
"""Tests of this method: tessellm's conformance kit, what it stores, the engine using it."""

import torch
from tessellm import LLM, SamplingParams
from tessellm.testing import check_quantization_method, tiny_model
from torch import nn

from $package.method import (
    $class_name,
)

METHOD = "$name"


def test_conforms_to_a_dense_linear_layer():
    # Random layers, loaded and processed as the engine does, against F.linear within the
    # kit's stated tolerance.
    result = check_quantization_method(METHOD)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()


def test_stores_int8_and_one_scale_per_output_channel():
    torch.manual_seed(0)
    method, layer = $class_name(), nn.Module()
    method.create_weights(layer, in_features=64, out_features=32, dtype=torch.float32)
    dense = torch.randn(32, 64)
    layer.weight.data.copy_(dense)
    method.process_weights_after_loading(layer)
    assert layer.qweight.dtype == torch.int8 and layer.weight_scale.shape == (32,)
    assert not hasattr(layer, "weight")
    dequantized = layer.qweight.float() * layer.weight_scale[:, None]
    # Rounding moves each weight by at most half a step of its row.
    assert bool(((dequantized - dense).abs() <= layer.weight_scale[:, None] / 2 + 1e-6).all())
    x = torch.randn(5, 64)
    assert torch.allclose(method.apply(layer, x, None), x @ dequantized.T, atol=1e-4)


def test_engine_generates_with_the_method(tmp_path, monkeypatch):
    calls = []
    apply = $class_name.apply

    def counted(self, layer, x, bias):
        calls.append(tuple(x.shape))
        return apply(self, layer, x, bias)

    monkeypatch.setattr($class_name, "apply", counted)
    model = tiny_model("LlamaForCausalLM", tmp_path / "model")
    llm = LLM(str(model), quantization=METHOD, dtype="float32", enforce_eager=True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.generate([[1, 5, 6, 7]], params)
    assert len(out[0].outputs[0].token_ids) == 8
    assert calls, "the engine's linear layers never ran the method"
'''
