"""The ``compressed-tensors`` quantization method: checkpoints as llm-compressor writes
them (``quantization_config.quant_method == "compressed-tensors"``).

The checkpoint's config is read into one scheme (:mod:`.config`); each linear layer is
then built, loaded and run by that scheme's layer method, which reuses the sibling
packages' kernels:

==================  ===================  ==========================================
scheme              stored as            runs on
==================  ===================  ==========================================
W4A16, W8A16        ``pack-quantized``   :mod:`.packed` (tessellm_quant_int4's
                                         runtime; tessellm_quant_int8's weight-only)
W8A8 int8           ``int-quantized``    :mod:`.w8a8` (tessellm_quant_int8's W8A8)
W8A8 fp8, fp8 W8A16 ``float-quantized``  tessellm_quant_fp8's checkpoint layer
==================  ===================  ==========================================

``checkpoint_tensors`` is the format's reference compressor, computed with the
compressed-tensors library (:mod:`.checkpoint`). The library is imported when a method
is built, not when the plugin is listed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.quantization import QuantCapabilities, QuantizationMethod
from tessellm_quant_compressed_tensors.config import (
    GROUP_SIZES,
    PACKED_BITS,
    QUANT_METHOD,
    LinearScheme,
    default_scheme,
    parse_quantization_config,
)

RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A row's relative error beyond the conformance kit's own, on its 4-bit grid weights
# (worst row over the kit's layers, batches and dtypes on the CPU, measured, rounded up):
# - 4-bit symmetric: compressed-tensors' symmetric scale is max|w| / 7.5 (not / 8), so
#   the kit's grid of -8..7 steps is rounded again onto one 16/15 as wide: 14.2% worst
#   row (6.8% in fp16, whose rows drew luckier); with min/max zero points the grid is
#   held exactly, as are 8-bit weights to within the kit's 1%;
# - int8 W8A8: the activations rounded per token, 1.6%; per-tensor weight scales with a
#   static input scale (the reference's, for |x| <= 8) 4.6%;
# - fp8: tessellm_quant_fp8's own figure (its GPU path rounds activations too).
ROW_ERRORS = {
    ("wna16", 4, True): 0.135,
    ("wna16", 4, False): 0.0,
    ("wna16", 8, True): 0.0,
    ("wna16", 8, False): 0.0,
    ("int8_w8a8", 8, True): 0.035,
}


def linear_method(scheme: LinearScheme) -> QuantizationMethod:
    """The layer method of ``scheme`` (see the module docstring)."""
    if scheme.kind == "wna16":
        from tessellm_quant_compressed_tensors.packed import PackedWeightOnly

        return PackedWeightOnly(scheme.bits, scheme.group_size, scheme.symmetric)
    from tessellm_quant_compressed_tensors.w8a8 import Int8Linear, fp8_linear_method

    if scheme.kind == "int8_w8a8":
        return Int8Linear(scheme.static_activations)
    weight_only = scheme.kind == "fp8_weight_only"
    return fp8_linear_method(scheme.static_activations, weight_only)


class CompressedTensors(QuantizationMethod):
    """compressed-tensors checkpoints, one scheme for every linear layer of the decoder
    (see :mod:`tessellm_quant_compressed_tensors.config`)."""

    name = QUANT_METHOD
    capabilities = QuantCapabilities(
        device_types=("cpu", "cuda"),
        dtypes=RUN_DTYPES,
        checkpoint_formats=(QUANT_METHOD,),
        bits=PACKED_BITS,
        group_sizes=(*GROUP_SIZES, -1),
        row_error=ROW_ERRORS[("wna16", 4, True)],
    )

    def __init__(self, scheme: LinearScheme | None = None) -> None:
        self.scheme = scheme or default_scheme()
        self.linear = linear_method(self.scheme)
        # This checkpoint's scheme: the layer method's GPU requirement (fp8's _scaled_mm,
        # int8's IMMA) and its measured error.
        key = (self.scheme.kind, self.scheme.bits, self.scheme.symmetric)
        self.capabilities = replace(
            type(self).capabilities,
            min_cuda_capability=self.linear.capabilities.min_cuda_capability,
            bits=(self.scheme.bits,),
            group_sizes=(self.scheme.group_size,),
            row_error=ROW_ERRORS.get(key, self.linear.capabilities.row_error),
        )

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> CompressedTensors:
        """A checkpoint's compressed-tensors ``quantization_config``; None gives
        llm-compressor's W4A16 preset (int4, symmetric, groups of 128). ValueError names
        the scheme, format or setting that is not supported."""
        if quant_config is None:
            return cls()
        try:
            return cls(parse_quantization_config(quant_config))
        except ValueError as exc:
            raise ValueError(f"compressed-tensors: {exc}") from None

    def __repr__(self) -> str:
        return f"CompressedTensors({self.scheme.describe()})"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        self.linear.create_weights(layer, in_features, out_features, dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.linear.process_weights_after_loading(layer)

    def process_model_after_loading(self, model: nn.Module) -> None:
        self.linear.process_model_after_loading(model)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear.apply(layer, x, bias)

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a compressed-tensors checkpoint of this scheme stores for the dense
        ``[out, in]`` weight, computed with the compressed-tensors library (see
        :mod:`tessellm_quant_compressed_tensors.checkpoint`)."""
        from tessellm_quant_compressed_tensors.checkpoint import compress_linear

        return compress_linear(weight, self.scheme.scheme, self.scheme.format)
