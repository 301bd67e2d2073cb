"""BambaForCausalLM: an attention+SSM hybrid. Each decoder layer is pre-norm with a gated
MLP, and its mixer is either self-attention (grouped KV heads, rotary over
``partial_rotary_factor`` of each head; paged KV, full attention) or a Mamba2 mixer
(``mixer.py``; a recurrent-state slot): ``layers_block_type`` / ``attn_layer_indices``
say which. Both cache kinds come from the one memory budget (``cache_specs``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.cache_spec import FullAttentionSpec, LayerCacheSpec
from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
)
from tessellm.layers.rotary import RotaryEmbedding, rope_parameters
from tessellm.model_loader import head_size_of
from tessellm_mamba.mixer import Mamba2Mixer, MixerDims


def is_attention_layer(config: Any, layer_idx: int) -> bool:
    # transformers 5 names the kinds full_attention / linear_attention (4.x: attention/mamba)
    return config.layers_block_type[layer_idx] in ("full_attention", "attention")


def bamba_mixer_dims(config: Any) -> MixerDims:
    inner = int(config.mamba_expand * config.hidden_size)
    head_dim = config.mamba_d_head
    if head_dim in (None, "auto"):
        head_dim = inner // config.mamba_n_heads
    limit = config.time_step_limit or (0.0, float("inf"))
    return MixerDims(
        config.hidden_size,
        config.mamba_n_heads,
        int(head_dim),
        config.mamba_d_state,
        config.mamba_n_groups,
        inner,
        config.mamba_d_conv,
        config.mamba_chunk_size,
        tuple(limit),
        bool(config.mamba_proj_bias),
        bool(config.mamba_conv_bias),
        config.rms_norm_eps,
    )


class MambaSubLayer(Mamba2Mixer):
    """The mixer where a decoder layer expects its attention (``(positions, hidden,
    metadata)``)."""

    def forward(  # type: ignore[override]
        self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return super().forward(hidden, metadata)


class BambaForCausalLM(DecoderForCausalLM):
    # Checkpoint names onto the shared decoder's: the Mamba mixer sits where attention does.
    weight_renames = (
        (".mamba.", ".self_attn."),
        (".feed_forward.", ".mlp."),
        (".pre_ff_layernorm.", ".post_attention_layernorm."),
        ("model.final_layernorm.", "model.norm."),
    )

    @classmethod
    def cache_specs(cls, config: Any) -> list[LayerCacheSpec]:
        state = bamba_mixer_dims(config).state_spec()
        return [
            FullAttentionSpec() if is_attention_layer(config, i) else state
            for i in range(config.num_hidden_layers)
        ]

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        head_size = head_size_of(config)
        factor = rope_parameters(config).get("partial_rotary_factor", 0.5)
        self.rotary = RotaryEmbedding(
            config, head_size, config.max_position_embeddings, rotary_dim=int(head_size * factor)
        )
        return DecoderModel(config, ctx, lambda i: self.build_layer(config, ctx, i))

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> nn.Module:
        if is_attention_layer(config, layer_idx):
            mixer: nn.Module = DecoderAttention(
                config,
                ctx,
                qkv_bias=config.attention_bias,
                o_bias=config.attention_bias,
                rotary=self.rotary,
            )
        else:
            mixer = MambaSubLayer(bamba_mixer_dims(config), ctx)
        mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, ctx, config.hidden_act, config.mlp_bias
        )
        return DecoderLayer(config, ctx, mixer, mlp)
