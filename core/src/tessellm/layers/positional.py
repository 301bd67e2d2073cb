"""Learned absolute position embeddings (GPT-2, OPT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPositionalEmbedding(nn.Module):
    """A table of ``num_positions`` vectors, read at ``positions + offset``.

    ``offset`` is where position 0 sits in the checkpoint's table: OPT reserves the first
    two rows (its table has ``max_position_embeddings + 2`` rows), GPT-2 uses none. The
    table is small, so every tensor-parallel rank keeps all of it.
    """

    def __init__(
        self, num_positions: int, hidden_size: int, dtype: torch.dtype, offset: int = 0
    ) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(
            torch.zeros(num_positions + offset, hidden_size, dtype=dtype), requires_grad=False
        )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + self.offset, self.weight)
