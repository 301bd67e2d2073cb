"""What a pipeline stage builds of a :class:`~tessellm.layers.decoder.DecoderModel`.

A stage builds only its own layers (``ParallelInfo.pipeline``); the others are
:class:`PipelineMissingLayer` placeholders, so layer ``i`` keeps its index and its
checkpoint names (``model.layers.i.…``), and a checkpoint tensor of another stage's layer
names no parameter here and is skipped as the weights load. The embedding lives on the
first stage (and on the last where the LM head is tied to it), the final norm and LM head
on the last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext


class PipelineMissingLayer(nn.Module):
    """A layer another stage holds: no parameters, and never run here."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this decoder layer belongs to another pipeline stage")


def is_first_stage(ctx: ModelContext) -> bool:
    stage = ctx.parallel.pipeline
    return stage is None or stage.is_first


def is_last_stage(ctx: ModelContext) -> bool:
    stage = ctx.parallel.pipeline
    return stage is None or stage.is_last


def holds_embedding(config: Any, ctx: ModelContext) -> bool:
    """The first stage embeds; the last needs the embedding too when the head is tied."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return is_first_stage(ctx) or (tied and is_last_stage(ctx))


def stage_layers(
    num_layers: int, ctx: ModelContext, build_layer: Callable[[int], nn.Module]
) -> nn.ModuleList:
    """Layers ``0 … num_layers - 1``, built only where this stage holds them."""
    stage = ctx.parallel.pipeline
    return nn.ModuleList(
        build_layer(i) if stage is None or stage.holds(i) else PipelineMissingLayer()
        for i in range(num_layers)
    )


def run_stage_layers(
    body: nn.Module,
    start: int,
    end: int,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    metadata: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``DecoderModel.forward``'s layer loop over layers ``[start, end)`` only."""
    for layer in body.layers[start:end]:
        hidden, residual = layer(positions, hidden, residual, metadata)
    return hidden, residual


def embed(body: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``DecoderModel.forward``'s first lines: the (scaled) embedding."""
    hidden = body.embed_tokens(input_ids)
    if body.embedding_multiplier is not None:
        hidden = hidden * body.embedding_multiplier
    return hidden
