"""W8A8 linears: ``int-quantized`` int8 and ``float-quantized`` fp8, on the sibling
packages' layers.

Both store, per linear, ``weight`` (int8 or float8_e4m3fn ``[N, K]``), ``weight_scale``
(``[N, 1]`` per channel or ``[1]`` per tensor, in the model's dtype) and, with static
activations, ``input_scale`` ``[1]``: the layout ``tessellm_quant_fp8``'s checkpoint mode
reads as it is. For int8, ``tessellm_quant_int8``'s W8A8 layer (per-channel int8 weights,
activations quantized per token) gains what compressed-tensors adds: per-tensor weight
scales (each fused shard's repeated over its channels, with fp8's loader) and a static
per-tensor activation scale (the largest of a fused layer's shards, as vLLM takes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.quantization import set_weight_attrs
from tessellm_quant_fp8.method import Fp8Method, load_weight_scale
from tessellm_quant_int8.methods import Int8W8A8

INT8_MIN, INT8_MAX = -128, 127


def fp8_linear_method(static_activations: bool, weight_only: bool) -> Fp8Method:
    """fp8's checkpoint layer; weight-only schemes always take its dequantizing
    reference kernel (no activation rounding, on any device)."""
    scheme = "static" if static_activations else "dynamic"
    return Fp8Method(
        checkpoint=True, activation_scheme=scheme, kernel="reference" if weight_only else "auto"
    )


def static_int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W8A8 with a static per-tensor activation scale: ``x`` rounded to
    ``clamp(round(x / input_scale), -128, 127)``, times int8 ``q [N, K]``, rescaled by
    ``input_scale * scale[n]``. The integer product runs as a float matmul of the integers
    (float32 on the CPU, exact while its sums stay below 2**24; the run dtype on a GPU,
    which holds int8 values exactly and accumulates in float32)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    s_in = input_scale.float()
    xq = torch.round(rows.float() / s_in).clamp_(INT8_MIN, INT8_MAX)
    compute = torch.float32 if rows.device.type == "cpu" else rows.dtype
    acc = F.linear(xq.to(compute), q.to(compute)).float()
    out = acc.mul_(s_in * scale.float().reshape(1, -1))
    if bias is not None:
        out = out.add_(bias)
    return out.to(x.dtype).view(*x.shape[:-1], q.shape[0])


class Int8Linear(Int8W8A8):
    """``tessellm_quant_int8``'s W8A8 checkpoint layer with per-tensor weight scales and,
    with ``static_activations``, a checkpoint ``input_scale``."""

    name = "compressed-tensors:int-quantized"

    def __init__(self, static_activations: bool) -> None:
        super().__init__(checkpoint=True)
        self.static_activations = static_activations

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        super().create_weights(layer, in_features, out_features, dtype)
        # Per channel [N, 1] as the parent stores it; a per-tensor [1] fills its shard.
        layer.weight_scale.data.fill_(float("nan"))
        layer.weight_scale.load_shard = load_weight_scale
        if self.static_activations:
            shards = len(layer.output_shard_sizes)
            input_scale = torch.full((shards,), float("nan"), dtype=torch.float32)
            layer.input_scale = nn.Parameter(input_scale, requires_grad=False)
            set_weight_attrs(layer.input_scale, output_dim=None, shard_indexed=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        _check_loaded(layer, layer.weight_scale.data, "weight_scale")
        if self.static_activations:
            _check_loaded(layer, layer.input_scale.data, "input_scale")
            # One activation feeds every fused shard: the largest scale clips none of them.
            layer.input_scale = nn.Parameter(layer.input_scale.data.max(), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.static_activations:
            return static_int8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias)
        return super().apply(layer, x, bias)


def _check_loaded(layer: nn.Module, values: torch.Tensor, name: str) -> None:
    """Every shard's scale was loaded (the engine checks parameter names only)."""
    missing = torch.isnan(values.reshape(-1))
    if bool(missing.any()):
        raise ValueError(
            f"compressed-tensors: {name} of {type(layer).__name__} is missing for "
            f"{int(missing.sum())} of {missing.numel()} entries"
        )
