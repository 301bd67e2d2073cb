"""The ``int8`` (W8A8) and ``int8_weight_only`` quantization methods.

Both keep each linear's weight as int8 ``weight [N, K]`` with a float32 ``weight_scale
[N, 1]`` per output channel (see :mod:`tessellm_quant_int8.kernels`). Built with
``from_config(None)`` (a dense checkpoint, ``quantization="int8"``), a layer loads the
dense weight in the run dtype and quantizes it in ``process_weights_after_loading``,
keeping no dense copy. Built for a checkpoint that already holds int8 weights
(``from_config({"quant_method": "int8"})`` or ``checkpoint=True``), a layer registers
``weight`` int8 and ``weight_scale`` float32 and loads them as stored; that is the layout
``checkpoint_tensors`` writes, and the compressed-tensors package's int8 schemes reuse.

The LM head and the embedding stay dense (as vLLM's int8 schemes leave them).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.interfaces.quantization import (
    QuantCapabilities,
    QuantizationMethod,
    set_weight_attrs,
)
from tessellm_quant_int8.kernels import (
    int8_linear,
    packed_scale,
    quantize_per_channel_int8,
    weight_only_int8_linear,
)

RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Keys of a checkpoint config this package understands (anything else is refused).
_CONFIG_KEYS = {"quant_method", "bits", "group_size"}


class _Int8PerChannel(QuantizationMethod):
    """Shared by both methods: storage, loading, online quantization."""

    def __init__(self, checkpoint: bool = False) -> None:
        self.checkpoint = checkpoint

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> _Int8PerChannel:
        """None: online quantization of a dense checkpoint. A dict describes a checkpoint
        in this package's layout (``weight`` int8 + ``weight_scale [N, 1]``):
        ``quant_method`` ``"int8"``, optional ``bits`` 8 and ``group_size`` -1 (one
        scale per output channel); anything else is refused with a ValueError."""
        if quant_config is None:
            return cls()
        method = str(quant_config.get("quant_method", "int8")).lower()
        if method != "int8":
            raise ValueError(
                f"{cls.name} reads int8 per-channel checkpoints (quant_method 'int8'), not "
                f"{method!r}; compressed-tensors int8 checkpoints are read by "
                "tessellm-quant-compressed-tensors"
            )
        if quant_config.get("bits", 8) != 8:
            raise ValueError(f"{cls.name}: bits {quant_config['bits']} (only 8 is supported)")
        if quant_config.get("group_size", -1) not in (-1, None):
            raise ValueError(
                f"{cls.name}: group_size {quant_config['group_size']} (only -1, one scale "
                "per output channel, is supported)"
            )
        unknown = sorted(set(quant_config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{cls.name}: unsupported quantization_config keys {unknown}")
        return cls(checkpoint=True)

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        if not self.checkpoint:  # a dense checkpoint: quantized once loaded
            weight = torch.empty(out_features, in_features, dtype=dtype)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            set_weight_attrs(layer.weight, output_dim=0, input_dim=1)
            return
        weight = torch.empty(out_features, in_features, dtype=torch.int8)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        set_weight_attrs(layer.weight, output_dim=0, input_dim=1)
        scale = torch.empty(out_features, 1, dtype=torch.float32)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        # One scale per output row: fused shards and column splits place it by rows; a
        # row-parallel split leaves it whole.
        set_weight_attrs(layer.weight_scale, output_dim=0, input_dim=None)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.dtype == torch.int8:  # loaded int8, or already processed
            layer.weight.data = layer.weight.data.contiguous()
        else:
            q, scale = quantize_per_channel_int8(layer.weight.data)
            # Replacing the parameter drops the dense weight (nothing else holds it).
            layer.weight = nn.Parameter(q, requires_grad=False)
            set_weight_attrs(layer.weight, output_dim=0, input_dim=1)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
            set_weight_attrs(layer.weight_scale, output_dim=0, input_dim=None)
        # The CPU's packed kernel takes the scales in bf16 (kernels.packed_scale); kept
        # here, not made per call, so a compiled decode step receives them as an input.
        scale_bf16 = packed_scale(layer.weight_scale.data)
        layer.register_buffer("weight_scale_bf16", scale_bf16, persistent=False)

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference quantizer of the layout (``checkpoint=True``): ``weight`` int8
        ``[N, K]`` and ``weight_scale`` float32 ``[N, 1]`` (``scale = max|row| / 127``).
        The online method (``from_config(None)``) loads a dense checkpoint:
        ``{"weight": weight}``."""
        if not self.checkpoint:
            return {"weight": weight}
        q, scale = quantize_per_channel_int8(weight)
        return {"weight": q, "weight_scale": scale}


class Int8W8A8(_Int8PerChannel):
    """W8A8 int8: per-channel int8 weights, activations quantized per token at each
    call, the integer product through ``torch._int_mm`` on CUDA (the CPU's kernels: see
    :mod:`tessellm_quant_int8.kernels`), rescaled in float32."""

    name = "int8"
    capabilities: ClassVar[QuantCapabilities] = QuantCapabilities(
        device_types=("cpu", "cuda"),
        # int8 tensor-core GEMMs (cuBLASLt IMMA) start with Turing.
        min_cuda_capability=(7, 5),
        dtypes=RUN_DTYPES,
        bits=(8,),
        group_sizes=(-1,),
        # A row's relative error beyond the kit's own, from rounding each token to 8
        # bits (up to half a step of max|x|/127 per element): on the kit's layers the
        # worst row measured 1.3% over its float64 reference (median 0.6%).
        row_error=0.01,
    )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(
            x, layer.weight, layer.weight_scale, bias, scale_bf16=layer.weight_scale_bf16
        )


class Int8WeightOnly(_Int8PerChannel):
    """Weight-only int8: per-channel int8 weights, activations in the run dtype."""

    name = "int8_weight_only"
    capabilities: ClassVar[QuantCapabilities] = QuantCapabilities(
        device_types=("cpu", "cuda"),
        dtypes=RUN_DTYPES,
        bits=(8,),
        group_sizes=(-1,),
    )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return weight_only_int8_linear(
            x, layer.weight, layer.weight_scale, bias, scale_bf16=layer.weight_scale_bf16
        )
