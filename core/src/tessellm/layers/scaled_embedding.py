"""A token embedding whose output is multiplied by a constant (Gemma's ``sqrt(hidden)``)."""

from __future__ import annotations

import torch

from tessellm.interfaces.model import ModelContext
from tessellm.layers.embedding import VocabParallelEmbedding


class ScaledVocabEmbedding(VocabParallelEmbedding):
    """``embedding(ids) * scale`` with the scale first rounded to the model dtype.

    Gemma multiplies by ``sqrt(hidden_size)`` cast to the weights' dtype (in bf16 that is
    not exactly the square root), so the rounding is part of the model's definition.
    """

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ModelContext, scale: float):
        super().__init__(vocab_size, hidden_size, ctx)
        # Rounded once, here, to a float the model dtype holds exactly: a tensor made in
        # forward would be a host-to-device copy, which CUDA graph capture refuses.
        self.scale = float(torch.tensor(scale, dtype=ctx.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.scale
