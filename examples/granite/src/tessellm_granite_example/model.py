"""Granite: a Llama-shaped decoder with four scalar multipliers, all from its config.

- ``embedding_multiplier``: the token embeddings are multiplied by it;
- ``attention_multiplier``: the attention score scale (instead of ``head_dim ** -0.5``);
- ``residual_multiplier``: each sub-layer's output is multiplied by it before the
  residual add;
- ``logits_scaling``: the logits are divided by it.

Each is a knob of tessellm's shared decoder (``docs/models.md``), so the layers stay the
shared ones and every platform's fused kernels still apply where they are exact.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
)


class GraniteForCausalLM(DecoderForCausalLM):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__(config, ctx, logits_scaling=config.logits_scaling)

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        return DecoderModel(
            config,
            ctx,
            lambda i: self.build_layer(config, ctx, i),
            embedding_multiplier=config.embedding_multiplier,
        )

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        attention = DecoderAttention(
            config, ctx, qkv_bias=bias, o_bias=bias, scale=config.attention_multiplier
        )
        mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            ctx,
            config.hidden_act,
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        return DecoderLayer(
            config, ctx, attention, mlp, residual_multiplier=config.residual_multiplier
        )
