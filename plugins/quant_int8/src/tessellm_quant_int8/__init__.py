"""Int8 quantization for tessellm: ``int8`` (W8A8) and ``int8_weight_only``."""

from tessellm_quant_int8.kernels import (
    dequantize_per_channel_int8,
    int8_linear,
    packed_scale,
    quantize_per_channel_int8,
    quantize_per_token_int8,
    weight_only_int8_linear,
)

__all__ = [
    "dequantize_per_channel_int8",
    "int8_linear",
    "packed_scale",
    "quantize_per_channel_int8",
    "quantize_per_token_int8",
    "weight_only_int8_linear",
]
