"""Mamba2ForCausalLM: embedding, ``num_hidden_layers`` of (RMSNorm -> Mamba2 mixer ->
residual), final RMSNorm, LM head; the mixers' conv and SSM states live in the engine's
recurrent-state slots (``tessellm.interfaces.cache_spec``), one per running request.

The mixer (shared with the hybrids) is ``mixer.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.cache_spec import LayerCacheSpec
from tessellm.interfaces.model import AttentionRequirements, ModelContext
from tessellm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tessellm.layers.weight_loading import load_by_rules
from tessellm_mamba.mixer import Mamba2Mixer, MixerDims


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Mamba2Block(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, ctx.dtype)
        self.mixer = Mamba2Mixer(MixerDims.of_mamba2(config), ctx)
        self.residual_in_fp32 = bool(config.residual_in_fp32)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        return (residual + self.mixer(self.norm(hidden), metadata)).to(hidden.dtype)


class Mamba2Model(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            Mamba2Block(config, ctx) for _ in range(config.num_hidden_layers)
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, metadata)
        return self.norm_f(hidden)


class Mamba2ForCausalLM(nn.Module):
    """transformers' ``Mamba2ForCausalLM`` (checkpoint names ``backbone.*``, ``lm_head``)."""

    @classmethod
    def attention_requirements(cls, config: Any) -> AttentionRequirements:
        # No attention layer: any backend will do (it is chosen, never called).
        return AttentionRequirements(head_size=64, num_heads=1, num_kv_heads=1)

    @classmethod
    def cache_specs(cls, config: Any) -> list[LayerCacheSpec]:
        return [MixerDims.of_mamba2(config).state_spec()] * config.num_hidden_layers

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        if ctx.parallel.world_size > 1:
            raise ModelLoadError("Mamba2ForCausalLM runs without tensor parallelism for now")
        self.config = config
        self.backbone = Mamba2Model(config, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.backbone.embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.backbone(input_ids, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = load_by_rules(
            self,
            weights,
            renames=(("backbone.embedding.", "backbone.embeddings."),),
            skip=lambda name: self.tied and name == "lm_head.weight",
        )
        if self.tied:
            loaded.add("lm_head.weight")
        return loaded
