"""Mistral (every layer windowed by ``sliding_window``) and Mixtral (top-2 of 8 experts).

As in transformers, the window applies to all layers whenever ``sliding_window`` is set
(``layer_types`` is not consulted; alternating layers are the Ministral architecture).
"""

from __future__ import annotations

from typing import Any

from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import DecoderAttention, DecoderForCausalLM, DecoderLayer, GatedMLP
from tessellm.layers.moe import SparseMoeBlock, expert_weight_rules
from tessellm.layers.weight_loading import QKV_GATE_UP_RULES


def mistral_attention(config: Any, ctx: ModelContext) -> DecoderAttention:
    return DecoderAttention(config, ctx, sliding_window=getattr(config, "sliding_window", None))


class MistralForCausalLM(DecoderForCausalLM):
    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, ctx, config.hidden_act)
        return DecoderLayer(config, ctx, mistral_attention(config, ctx), mlp)


class MixtralForCausalLM(DecoderForCausalLM):
    # Checkpoints name the MoE block ``block_sparse_moe`` and its experts' gate/down/up
    # matrices ``w1``/``w2``/``w3``.
    weight_renames = ((".block_sparse_moe.", ".mlp."),)
    weight_rules = expert_weight_rules("w1", "w3", "w2") + QKV_GATE_UP_RULES

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        moe = SparseMoeBlock(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            ctx,
            renormalize=True,
            activation=config.hidden_act,
        )
        return DecoderLayer(config, ctx, mistral_attention(config, ctx), moe)
