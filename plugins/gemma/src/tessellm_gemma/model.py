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

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import DecoderAttention, GatedMLP, layer_sliding_window
from tessellm.layers.embedding import ParallelLMHead
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.scaled_embedding import ScaledVocabEmbedding
from tessellm.layers.softcap import soft_cap
from tessellm.layers.weight_loading import QKV_GATE_UP_RULES, load_by_rules

GEMMA_NORM_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + weight)


def layer_type_of(config: Any, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx]
    return "sliding_attention" if layer_sliding_window(config, layer_idx) else "full_attention"


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
        # never applies it (its q/k norms bound the scores instead).
        logits_soft_cap=None if gemma3 else getattr(config, "attn_logit_softcapping", None),
        norm_offset=GEMMA_NORM_OFFSET,
    )


class GemmaDecoderLayer(nn.Module):
    """Pre- and post-norm around both sub-layers; the residual adds are fused into the
    pre-norms, so ``forward`` carries the residual stream separately."""

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        layer_idx: int,
        rotary: RotaryEmbedding,
        gemma3: bool,
    ) -> None:
        super().__init__()
        self.self_attn = gemma_attention(config, ctx, layer_idx, rotary, gemma3)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            ctx,
            activation=getattr(config, "hidden_activation", None) or config.hidden_act,
        )
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, ctx.dtype, GEMMA_NORM_OFFSET)
        self.post_attention_layernorm = RMSNorm(size, eps, ctx.dtype, GEMMA_NORM_OFFSET)
        self.pre_feedforward_layernorm = RMSNorm(size, eps, ctx.dtype, GEMMA_NORM_OFFSET)
        self.post_feedforward_layernorm = RMSNorm(size, eps, ctx.dtype, GEMMA_NORM_OFFSET)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext, gemma3: bool) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.embed_tokens = ScaledVocabEmbedding(
            config.vocab_size, hidden_size, ctx, scale=hidden_size**0.5
        )
        head_size = getattr(config, "head_dim", None) or hidden_size // config.num_attention_heads
        types = [layer_type_of(config, i) for i in range(config.num_hidden_layers)]
        # One table per layer type (Gemma 3's sliding layers use another rope base);
        # transformers' per-type rope_parameters are read when the config has them.
        per_type = isinstance(getattr(config, "rope_parameters", None), dict) and all(
            t in config.rope_parameters for t in types
        )
        rotaries = nn.ModuleDict(
            {
                t: RotaryEmbedding(
                    config,
                    head_size,
                    config.max_position_embeddings,
                    layer_type=t if per_type else None,
                )
                for t in sorted(set(types))
            }
        )
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, ctx, i, rotaries[t], gemma3) for i, t in enumerate(types)
        )
        self.norm = RMSNorm(hidden_size, config.rms_norm_eps, ctx.dtype, GEMMA_NORM_OFFSET)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        return self.norm(hidden, residual)[0]


class _GemmaForCausalLM(nn.Module):
    """A :class:`tessellm.interfaces.model.CausalLM`; subclasses say which Gemma it is."""

    gemma3: ClassVar[bool]  # per-head q/k norms; no attention soft-cap

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelLoadError("bidirectional (embedding) Gemma models are not causal LMs")
        self.config = config
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.model = GemmaModel(config, ctx, self.gemma3)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx)
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.lm_head(hidden), self.final_logit_softcapping)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def skip(name: str) -> bool:
            return self.tied and name == "lm_head.weight"

        loaded = load_by_rules(self, weights, QKV_GATE_UP_RULES, skip=skip)
        if self.tied:
            loaded.add("lm_head.weight")
        return loaded


class Gemma2ForCausalLM(_GemmaForCausalLM):
    gemma3 = False


class Gemma3ForCausalLM(_GemmaForCausalLM):
    gemma3 = True
