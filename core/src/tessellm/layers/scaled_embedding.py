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
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = super().forward(input_ids)
        return hidden * torch.tensor(self.scale, dtype=hidden.dtype, device=hidden.device)
