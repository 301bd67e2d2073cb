"""Llama: RMSNorm, rotary, grouped-query attention, SwiGLU MLP; optionally tied head.

The layers are tessellm's shared pre-norm decoder; Llama only says which biases it has.
"""

from __future__ import annotations

from typing import Any

from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import DecoderAttention, DecoderForCausalLM, DecoderLayer, GatedMLP


class LlamaForCausalLM(DecoderForCausalLM):
    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        attention_bias = bool(getattr(config, "attention_bias", False))
        attention = DecoderAttention(config, ctx, qkv_bias=attention_bias, o_bias=attention_bias)
        mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            ctx,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        return DecoderLayer(config, ctx, attention, mlp)
