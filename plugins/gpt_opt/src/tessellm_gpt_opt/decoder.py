"""The LayerNorm decoder GPT-2 and OPT share, described by a :class:`LayerNormDecoderSpec`.

Learned absolute positions added to the token embedding, multi-head attention and a
plain MLP with biases, LayerNorm before each sub-layer (or after it, for OPT-350m), a
final LayerNorm, and (usually) an LM head tied to the embedding. The two families differ
only in the numbers of the spec and in their checkpoint names, which ``gpt2.py`` and
``opt.py`` map onto the parameter names here (OPT's, where the two differ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.layers.attention import Attention
from tessellm.layers.decoder import DecoderForCausalLM
from tessellm.layers.embedding import VocabParallelEmbedding
from tessellm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tessellm.layers.mlp import MLP
from tessellm.layers.norm import LayerNorm
from tessellm.layers.positional import LearnedPositionalEmbedding
from tessellm.layers.weight_loading import stacked_rules

QKV_RULES = stacked_rules(
    (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"))
)


@dataclass(frozen=True, slots=True)
class LayerNormDecoderSpec:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    activation: str
    layer_norm_eps: float = 1e-5
    bias: bool = True
    position_offset: int = 0  # rows of the position table before position 0 (OPT: 2)
    norm_before: bool = True  # pre-LN; OPT-350m normalises after the residual add
    final_norm: bool = True
    embed_size: int | None = None  # word-embedding width when projected (OPT-350m)
    scale_attn_weights: bool = True
    scale_by_inverse_layer: bool = False  # GPT-2 option: scores also / (layer + 1)
    scale_query_first: bool = False  # OPT scales q before q·k (the same maths, its rounding)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


class LayerNormAttention(nn.Module):
    def __init__(self, spec: LayerNormDecoderSpec, ctx: ModelContext, layer_idx: int) -> None:
        super().__init__()
        hidden, heads, head_size = spec.hidden_size, spec.num_heads, spec.head_size
        self.qkv_proj = QKVParallelLinear(hidden, head_size, heads, heads, ctx, bias=spec.bias)
        self.o_proj = RowParallelLinear(hidden, hidden, ctx, bias=spec.bias)
        scale = head_size**-0.5 if spec.scale_attn_weights else 1.0
        if spec.scale_by_inverse_layer:
            scale /= layer_idx + 1
        self.query_scale = scale if spec.scale_query_first else None
        local_heads = self.qkv_proj.num_heads
        attn_scale = 1.0 if spec.scale_query_first else scale
        self.attn = Attention(local_heads, head_size, attn_scale, local_heads, ctx)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        size = self.qkv_proj.q_size
        q, k, v = self.qkv_proj(hidden).split([size, size, size], dim=-1)
        if self.query_scale is not None:
            q = q * self.query_scale
        return self.o_proj(self.attn(q, k, v, metadata))


class LayerNormDecoderLayer(nn.Module):
    def __init__(self, spec: LayerNormDecoderSpec, ctx: ModelContext, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = spec.hidden_size, spec.layer_norm_eps
        self.norm_before = spec.norm_before
        self.self_attn_layer_norm = LayerNorm(hidden, eps, ctx.dtype)
        self.self_attn = LayerNormAttention(spec, ctx, layer_idx)
        self.final_layer_norm = LayerNorm(hidden, eps, ctx.dtype)
        self.mlp = MLP(hidden, spec.intermediate_size, ctx, spec.activation, bias=spec.bias)

    def _residual(
        self, hidden: torch.Tensor, norm: nn.Module, block: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.norm_before:
            return hidden + block(norm(hidden))
        return norm(hidden + block(hidden))

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self._residual(
            hidden, self.self_attn_layer_norm, lambda x: self.self_attn(x, metadata)
        )
        return self._residual(hidden, self.final_layer_norm, self.mlp)


def _projection(in_size: int, out_size: int, ctx: ModelContext) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_size, out_size, ctx, bias=False, gather_output=True)


class LayerNormDecoderModel(nn.Module):
    def __init__(
        self,
        spec: LayerNormDecoderSpec,
        ctx: ModelContext,
        build_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        hidden = spec.hidden_size
        embed_size = spec.embed_size or hidden
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, embed_size, ctx)
        self.embed_positions = LearnedPositionalEmbedding(
            spec.max_positions, hidden, ctx.dtype, offset=spec.position_offset
        )
        projected = embed_size != hidden
        self.project_in = _projection(embed_size, hidden, ctx) if projected else None
        self.layers = nn.ModuleList(build_layer(i) for i in range(spec.num_layers))
        self.final_layer_norm = (
            LayerNorm(hidden, spec.layer_norm_eps, ctx.dtype) if spec.final_norm else None
        )
        self.project_out = _projection(hidden, embed_size, ctx) if projected else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions)
        for layer in self.layers:
            hidden = layer(hidden, metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class LayerNormDecoderForCausalLM(DecoderForCausalLM):
    """The shared causal-LM wrapper over :class:`LayerNormDecoderModel`. Subclasses turn
    the HF config into a spec (``spec_from_config``) and their checkpoint names into ours
    (``checkpoint_names``)."""

    weight_rules = QKV_RULES
    spec: LayerNormDecoderSpec

    @staticmethod
    def spec_from_config(config: Any) -> LayerNormDecoderSpec:
        raise NotImplementedError

    def checkpoint_names(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's entries under this module's parameter names (q/k/v separate)."""
        raise NotImplementedError

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        self.spec = self.spec_from_config(config)
        return LayerNormDecoderModel(self.spec, ctx, lambda i: self.build_layer(config, ctx, i))

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> nn.Module:
        return LayerNormDecoderLayer(self.spec, ctx, layer_idx)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self.checkpoint_names(weights))
