"""Phi-3: a Llama-style decoder whose checkpoint fuses q/k/v and gate/up, with rotary over
part of each head (``partial_rotary_factor``) and LongRoPE for the long-context models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    GatedMLP,
    layer_sliding_window,
)
from tessellm.layers.rotary import RotaryEmbedding, rope_parameters
from tessellm.layers.rotary_longrope import LongRopeRotaryEmbedding, is_longrope
from tessellm.layers.weight_streams import split_fused
from tessellm.model_loader import head_size_of


def phi3_rotary(config: Any) -> RotaryEmbedding:
    """One rotary table for all layers, over the first ``partial_rotary_factor`` of a head."""
    head_size = head_size_of(config)
    factor = rope_parameters(config).get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
    )
    rotary_dim = int(head_size * factor)
    max_position = config.max_position_embeddings
    if is_longrope(config):
        return LongRopeRotaryEmbedding(config, head_size, max_position, rotary_dim)
    return RotaryEmbedding(config, head_size, max_position, rotary_dim=rotary_dim)


class Phi3ForCausalLM(DecoderForCausalLM):
    rotary: RotaryEmbedding

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        self.rotary = phi3_rotary(config)  # one table, shared by every layer
        return super().build_model(config, ctx)

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> nn.Module:
        window = layer_sliding_window(config, layer_idx)
        attention = DecoderAttention(config, ctx, sliding_window=window, rotary=self.rotary)
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, ctx, config.hidden_act)
        return DecoderLayer(config, ctx, attention, mlp)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        if isinstance(self.rotary, LongRopeRotaryEmbedding):
            positions = self.rotary.table_positions(positions, metadata)
        return super().forward(input_ids, positions, metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        config = self.config
        head_size = head_size_of(config)
        q_rows = config.num_attention_heads * head_size
        kv_rows = (config.num_key_value_heads or config.num_attention_heads) * head_size
        qkv = [(".q_proj.", q_rows), (".k_proj.", kv_rows), (".v_proj.", kv_rows)]
        weights = split_fused(weights, ".qkv_proj.", qkv)
        gate_up = [
            (".gate_proj.", config.intermediate_size),
            (".up_proj.", config.intermediate_size),
        ]
        weights = split_fused(weights, ".gate_up_proj.", gate_up)
        return super().load_weights(weights)
