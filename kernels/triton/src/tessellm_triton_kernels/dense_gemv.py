"""``unquantized_gemv``: dense weights, with one-row products on the Triton GEMV.

Weights are created, loaded and stored exactly as by the plain method ("none"); only the
multiply differs, and only where the GEMV is faster than cuBLAS: one input row (batch-1
decode) in bf16 or fp16 on a GPU. Everything else (prompts, larger batches, fp32, which
is the exact reference) goes to ``torch.nn.functional.linear``. The CUDA platform makes
this the default method in bf16/fp16 (``Platform.default_quantization``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.quantization import Unquantized

from .gemv import GemvConfig, gemv

GEMV_DTYPES = (torch.bfloat16, torch.float16)


class UnquantizedGemv(Unquantized):
    name = "unquantized_gemv"

    def __init__(
        self,
        config: GemvConfig | None = None,
        *,
        device_types: tuple[str, ...] = ("cuda",),
        dtypes: tuple[torch.dtype, ...] = GEMV_DTYPES,
    ) -> None:
        self.config = config  # None: the kernel's measured default
        # Where the GEMV runs instead of torch's linear. Tests widen these to run the
        # kernel (and the fused forms that check them, ``linear_ops``) in the interpreter.
        self.device_types = device_types
        self.dtypes = dtypes

    def runs_gemv(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``apply`` multiplies this input on the Triton GEMV."""
        return (
            x.dim() == 2
            and x.shape[0] == 1
            and x.device.type in self.device_types
            and x.dtype == weight.dtype
            and weight.dtype in self.dtypes
        )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        if self.runs_gemv(x, weight):
            return gemv(x, weight, bias, self.config)
        return F.linear(x, weight, bias)
