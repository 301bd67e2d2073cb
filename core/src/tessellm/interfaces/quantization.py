"""Quantization methods: how a linear layer stores, loads and multiplies its weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn


class QuantizationMethod(ABC):
    name: ClassVar[str]

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        """Register the layer's parameters (``in_features``/``out_features`` per rank)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` in whatever form the weights are kept."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027
        """Repack weights once all are loaded (optional)."""

    def process_model_after_loading(self, model: nn.Module) -> None:  # noqa: B027
        """Once per model after every layer's weights are processed: repack what is not a
        linear layer of this method (e.g. set ``ParallelLMHead.logits_matmul``). Optional."""


class Unquantized(QuantizationMethod):
    """Plain dense weights in the run dtype."""

    name = "none"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.linear(x, layer.weight, bias)
