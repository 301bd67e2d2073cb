"""Qwen2 (biased q/k/v), Qwen3 (per-head q/k RMSNorm) and Qwen3-MoE (sparse expert MLPs).

All three window only the layers transformers marks ``"sliding_attention"`` (Qwen2/Qwen3:
layers from ``max_window_layers`` on, when ``use_sliding_window``); Qwen3-MoE windows
every layer when ``use_sliding_window``.
"""

from __future__ import annotations

from typing import Any

from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    GatedMLP,
    layer_sliding_window,
)
from tessellm.layers.moe import SparseMoeBlock, expert_weight_rules
from tessellm.layers.weight_loading import QKV_GATE_UP_RULES


def dense_mlp(config: Any, ctx: ModelContext) -> GatedMLP:
    return GatedMLP(config.hidden_size, config.intermediate_size, ctx, config.hidden_act)


def qwen3_attention(config: Any, ctx: ModelContext, layer_idx: int) -> DecoderAttention:
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderAttention(
        config,
        ctx,
        sliding_window=layer_sliding_window(config, layer_idx),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
    )


class Qwen2ForCausalLM(DecoderForCausalLM):
    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        attention = DecoderAttention(
            config, ctx, sliding_window=layer_sliding_window(config, layer_idx), qkv_bias=True
        )
        return DecoderLayer(config, ctx, attention, dense_mlp(config, ctx))


class Qwen3ForCausalLM(DecoderForCausalLM):
    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        return DecoderLayer(
            config, ctx, qwen3_attention(config, ctx, layer_idx), dense_mlp(config, ctx)
        )


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Qwen3-MoE puts experts in every ``decoder_sparse_step``-th layer except those listed
    in ``mlp_only_layers``, which keep a dense MLP of ``intermediate_size``."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % step == 0
    )


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    weight_rules = expert_weight_rules("gate_proj", "up_proj", "down_proj") + QKV_GATE_UP_RULES

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        if is_sparse_layer(config, layer_idx):
            mlp = SparseMoeBlock(
                config.hidden_size,
                config.moe_intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                ctx,
                renormalize=bool(config.norm_topk_prob),
                activation=config.hidden_act,
            )
        else:
            mlp = dense_mlp(config, ctx)
        return DecoderLayer(config, ctx, qwen3_attention(config, ctx, layer_idx), mlp)
