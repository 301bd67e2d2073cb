"""Weight-only int4 for the CPU: 4-bit weights stay 4-bit in memory for small batches.

At batch 1 a CPU decode step reads every weight once and does little arithmetic with it,
so its speed is the memory bandwidth over the bytes read: a GGUF Q4 model dequantized to
bf16 reads four times the bytes of the file. These methods keep the dense weight (the
loaders and large batches use it, where compute dominates and the dense kernels are
faster) and add, after loading, a copy packed for torch's int4 CPU kernel: groups of 32
input features, each with a scale and a zero point, ``w = (q - 8) * scale + zero``. The
LM head gets 8-bit groups of 32 (GGUF Q8_0's layout), run as two 4-bit halves.

``woq_grid`` (the CPU platform's default in bf16/fp16) packs only weights that already
lie on such a grid, as a GGUF Q4_1 (linears) or Q8_0 (embedding/LM head) checkpoint's
do; other weights stay dense. The one change it makes is rounding each group's scale to
the run dtype, an error of the size the run dtype's rounding of the weights themselves
makes (measured on SmolLM2's LM head against fp32: mean absolute logit error 0.022,
dense bf16 0.019). ``woq_int4`` packs every eligible layer, rounding weights to 4 bits
(the LM head to 8): lossy, the user's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.quantization import QuantizationMethod
from tessellm_quant_int4.cpu_int4 import (
    GROUP_SIZE,
    INT4_MM,
    PACKED_MAX_ROWS,
    Int8GroupLogitsMatmul,
    int4_matmul,
    pack_int4,
    pack_int8_groups,
)


class WeightOnlyInt4(QuantizationMethod):
    """Dense weights plus an int4 copy for small batches (see the module docstring)."""

    name = "woq_int4"
    grid_only = False

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )
        layer.register_buffer("woq_packed", None, persistent=False)
        layer.register_buffer("woq_scales_zeros", None, persistent=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        if weight.device.type != "cpu":
            return
        result = pack_int4(weight.data, self.grid_only)
        if result is not None:
            layer.woq_packed, layer.woq_scales_zeros = result

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed, scales_zeros = layer.woq_packed, layer.woq_scales_zeros
        if packed is None or x.numel() > PACKED_MAX_ROWS[x.dtype] * x.shape[-1]:
            return F.linear(x, layer.weight, bias)
        if x.dim() == 2 and x.dtype == scales_zeros.dtype:  # the decode case, kept lean
            out = INT4_MM(
                x if x.is_contiguous() else x.contiguous(), packed, GROUP_SIZE, scales_zeros
            )
            return out if bias is None else out + bias
        return int4_matmul(x, packed, scales_zeros, bias)

    def process_model_after_loading(self, model: nn.Module) -> None:
        from tessellm.layers.embedding import ParallelLMHead

        for module in model.modules():
            if isinstance(module, ParallelLMHead) and module.weight.device.type == "cpu":
                packed = pack_int8_groups(module.weight.data, self.grid_only)
                if packed is not None:
                    module.logits_matmul = Int8GroupLogitsMatmul(module.weight.data, packed)


class GridWeightOnlyInt4(WeightOnlyInt4):
    name = "woq_grid"
    grid_only = True


def packed_layer_count(model: nn.Module) -> tuple[int, int]:
    """(layers with an int4 copy, layers using a weight-only method) — for reports."""
    using = [m for m in model.modules() if hasattr(m, "woq_packed")]
    return sum(m.woq_packed is not None for m in using), len(using)
