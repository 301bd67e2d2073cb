"""Vocabulary-parallel embedding and LM head: each rank holds a slice of the vocabulary."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.layers.parallel import all_gather_last_dim, all_reduce


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ModelContext) -> None:
        super().__init__()
        self.parallel = ctx.parallel
        tp = ctx.parallel.world_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp)
        self.start = self.parallel.rank * self.shard_size
        self.end = min(self.start + self.shard_size, vocab_size)
        self.weight = nn.Parameter(
            torch.zeros(self.shard_size, hidden_size, dtype=ctx.dtype), requires_grad=False
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        part = loaded[self.start : self.end]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids >= self.start) & (input_ids < self.end)
        local = torch.where(mask, input_ids - self.start, torch.zeros_like(input_ids))
        out = F.embedding(local, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.parallel)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary, gathered from every rank's slice."""

    # Set once after loading by a quantization method that multiplies by this head's weight
    # in another form (``hidden -> logits`` of this rank's slice, bias excluded).
    logits_matmul: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self, vocab_size: int, hidden_size: int, ctx: ModelContext, bias: bool = False
    ) -> None:
        super().__init__(vocab_size, hidden_size, ctx)
        self.bias = (
            nn.Parameter(torch.zeros(self.shard_size, dtype=ctx.dtype), requires_grad=False)
            if bias
            else None
        )

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.logits_matmul is not None:
            logits = self.logits_matmul(hidden)
            logits = logits + self.bias if self.bias is not None else logits
        else:
            logits = F.linear(hidden, self.weight, self.bias)
        logits = all_gather_last_dim(logits, self.parallel)
        return logits[..., : self.vocab_size]
