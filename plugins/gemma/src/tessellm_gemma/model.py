"""Gemma 2 and Gemma 3 (text): the shared decoder attention with Gemma's conventions.

What sets Gemma apart from a Llama-style decoder: the embedding is scaled by
``sqrt(hidden_size)``; every RMSNorm multiplies by ``1 + weight``; each layer normalises
the attention and MLP outputs again before adding them (``post_attention_layernorm``,
``post_feedforward_layernorm``) besides the usual pre-norms; scores are scaled by
``query_pre_attn_scalar ** -0.5``; layers alternate between a sliding window and global
attention (``layer_types``); Gemma 2 soft-caps attention scores and final logits. Gemma 3
adds per-head q/k norms and gives the sliding layers their own rotary base.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
    layer_sliding_window,
)
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.softcap import soft_cap
from tessellm.model_loader import head_size_of

GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + weight)


def layer_type_of(config: Any, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx]
    return "sliding_attention" if layer_sliding_window(config, layer_idx) else "full_attention"


def rotary_tables(config: Any) -> nn.ModuleDict:
    """One rotary table per layer type, shared by the layers of that type (Gemma 3's
    sliding layers have their own rope base, read from its per-type rope_parameters)."""
    head_size = head_size_of(config)
    types = {layer_type_of(config, i) for i in range(config.num_hidden_layers)}
    params = getattr(config, "rope_parameters", None)
    per_type = isinstance(params, dict) and all(t in params for t in types)
    return nn.ModuleDict(
        {
            t: RotaryEmbedding(
                config,
                head_size,
                config.max_position_embeddings,
                layer_type=t if per_type else None,
            )
            for t in sorted(types)
        }
    )


def gemma_attention(
    config: Any, ctx: ModelContext, layer_idx: int, rotary: RotaryEmbedding, gemma3: bool
) -> DecoderAttention:
    """The shared decoder attention with Gemma's score scale, soft-cap, ``(1 + weight)``
    q/k norms (Gemma 3) and a rotary table shared by the layers of one type."""
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderAttention(
        config,
        ctx,
        sliding_window=layer_sliding_window(config, layer_idx),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=gemma3,
        rotary=rotary,
        scale=float(config.query_pre_attn_scalar) ** -0.5,
        # Gemma 3 configs still carry attn_logit_softcapping, but transformers' Gemma 3
        # attention never applies it.
        logits_soft_cap=None if gemma3 else getattr(config, "attn_logit_softcapping", None),
        norm_offset=GEMMA_NORM_OFFSET,
    )


class GemmaDecoderLayer(DecoderLayer):
    """Pre- and post-norm around both sub-layers. The residual adds are fused into the
    pre-norms, so ``forward`` carries the residual stream separately."""

    def __init__(self, config: Any, ctx: ModelContext, self_attn: nn.Module, mlp: nn.Module):
        super().__init__(config, ctx, self_attn, mlp, norm_offset=GEMMA_NORM_OFFSET)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.pre_feedforward_layernorm = RMSNorm(size, eps, ctx.dtype, GEMMA_NORM_OFFSET)
        self.post_feedforward_layernorm = RMSNorm(size, eps, ctx.dtype, GEMMA_NORM_OFFSET)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The first layer's stream starts at zero: norm(hidden + 0) is norm(hidden) exactly.
        residual = torch.zeros_like(hidden) if residual is None else residual
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class _GemmaForCausalLM(DecoderForCausalLM):
    """The shared decoder with Gemma's layers, scaled embedding, ``1 + weight`` final norm
    and soft-capped logits; subclasses say which Gemma it is."""

    gemma3: ClassVar[bool]  # per-head q/k norms; no attention soft-cap

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelLoadError("bidirectional (embedding) Gemma models are not causal LMs")
        super().__init__(config, ctx)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        self.rotaries = rotary_tables(config)
        return DecoderModel(
            config,
            ctx,
            lambda i: self.build_layer(config, ctx, i),
            embed_scale=config.hidden_size**0.5,
            norm_offset=GEMMA_NORM_OFFSET,
        )

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> nn.Module:
        rotary = self.rotaries[layer_type_of(config, layer_idx)]
        attention = gemma_attention(config, ctx, layer_idx, rotary, self.gemma3)
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, ctx, activation)
        return GemmaDecoderLayer(config, ctx, attention, mlp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(super().compute_logits(hidden), self.final_logit_softcapping)


class Gemma2ForCausalLM(_GemmaForCausalLM):
    gemma3 = False


class Gemma3ForCausalLM(_GemmaForCausalLM):
    gemma3 = True
