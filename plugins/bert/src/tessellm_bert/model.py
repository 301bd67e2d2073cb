"""BERT (``BertModel``): a post-norm encoder with absolute positions, for embeddings.

Module names follow transformers' (``embeddings.*``, ``encoder.layer.N.attention.self``,
``...intermediate.dense``, ``...output.LayerNorm``), so checkpoints load by name; only the
query/key/value projections are fused into one matrix. Attention is bidirectional over
each prompt of the packed batch (``tessellm.layers.dense_attention``); there is no KV
cache. The pooler head (``pooler.dense``) is not built: sentence-transformers pools the
token states, and so does tessellm's pooling engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.interfaces.pooling import EncoderModel
from tessellm.layers.activation import get_activation
from tessellm.layers.dense_attention import (
    PaddedLayout,
    dense_attention,
    padded_attention,
    padded_layout,
)
from tessellm.layers.linear import ColumnParallelLinear, QKVParallelLinear
from tessellm.layers.weight_loading import WeightRule, load_by_rules, stacked_rules

# Prefixes of checkpoints saved from BERT heads (BertForMaskedLM ...), and what has no
# parameter here: the pooler, the pre-training heads, the cached position ids.
_PREFIXES = ("bert.",)
_SKIPPED = ("pooler.", "cls.", "embeddings.position_ids")
# Padded rows per real token above which a batch runs packed (its linears on the real
# tokens only, padded around each attention); below it the whole forward runs padded.
PACK_ABOVE = 1.15


def _layer_norm(config: Any, ctx: ModelContext) -> nn.LayerNorm:
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=ctx.dtype)
    norm.requires_grad_(False)
    return norm


def _embedding(rows: int, config: Any, ctx: ModelContext) -> nn.Embedding:
    table = nn.Embedding(rows, config.hidden_size, dtype=ctx.dtype)
    table.requires_grad_(False)
    return table


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.word_embeddings = _embedding(config.vocab_size, config, ctx)
        self.position_embeddings = _embedding(config.max_position_embeddings, config, ctx)
        self.token_type_embeddings = _embedding(config.type_vocab_size, config, ctx)
        self.LayerNorm = _layer_norm(config, ctx)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # One segment per prompt: token type 0 throughout, as a tokenizer gives one text.
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(hidden + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.num_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_size, self.num_heads, self.num_heads, ctx, bias=True
        )

    def forward(self, hidden: torch.Tensor, layout: PaddedLayout, packed: bool) -> torch.Tensor:
        rows = hidden.shape[0]
        scale = self.head_size**-0.5
        if packed:  # rows are the batch's tokens: padded around the attention only
            q, k, v = self.qkv_proj(hidden).view(rows, 3, self.num_heads, -1).unbind(1)
            out = dense_attention(q, k, v, layout, causal=False, scale=scale)
        else:  # rows are the padded grid's B * L
            grid = (layout.batch, layout.max_len, 3, self.num_heads, self.head_size)
            q, k, v = self.qkv_proj(hidden).view(grid).unbind(2)
            out = padded_attention(q, k, v, layout, causal=False, scale=scale)
        return out.reshape(rows, self.num_heads * self.head_size)


class BertDenseOutput(nn.Module):
    """``LayerNorm(dense(x) + residual)``: how each sub-layer of BERT ends."""

    def __init__(self, in_features: int, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        # Column-parallel (output-split) though it closes a sub-layer: the pooling engine
        # runs on one device, where the two are the same product, and this one adds the
        # bias inside the GEMM instead of in a pass of its own.
        self.dense = ColumnParallelLinear(in_features, config.hidden_size, ctx, bias=True)
        self.LayerNorm = _layer_norm(config, ctx)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, ctx)
        self.output = BertDenseOutput(config.hidden_size, config, ctx)

    def forward(self, hidden: torch.Tensor, layout: PaddedLayout, packed: bool) -> torch.Tensor:
        return self.output(self.self(hidden, layout, packed), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, ctx, bias=True
        )
        self.act = get_activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.attention = BertAttention(config, ctx)
        self.intermediate = BertIntermediate(config, ctx)
        self.output = BertDenseOutput(config.intermediate_size, config, ctx)

    def forward(self, hidden: torch.Tensor, layout: PaddedLayout, packed: bool) -> torch.Tensor:
        hidden = self.attention(hidden, layout, packed)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, ctx) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, layout: PaddedLayout, packed: bool) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, layout, packed)
        return hidden


class BertModel(EncoderModel):
    default_pooling: ClassVar[str] = "cls"  # vLLM's default for BERT without a recipe
    weight_rules: ClassVar[tuple[WeightRule, ...]] = stacked_rules(
        (("query", "qkv_proj", "q"), ("key", "qkv_proj", "k"), ("value", "qkv_proj", "v"))
    )

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__(config, ctx)
        kind = getattr(config, "position_embedding_type", None) or "absolute"
        if kind != "absolute":
            raise ModelLoadError(f"BertModel: position_embedding_type {kind!r} is not supported")
        if getattr(config, "is_decoder", False):
            raise ModelLoadError("BertModel: is_decoder (causal BERT) is not supported")
        self.config = config
        self.embeddings = BertEmbeddings(config, ctx)
        self.encoder = BertEncoder(config, ctx)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        layout = padded_layout(metadata)
        hidden = self.embeddings(input_ids, positions)
        grid = layout.batch * layout.max_len
        if grid > PACK_ABOVE * hidden.shape[0]:
            return self.encoder(hidden, layout, packed=True)
        # Little padding: the states stay in the padded grid through every layer, whose
        # few padding rows cost less than a pad and an unpad around each attention.
        hidden = layout.pad(hidden).view(grid, -1)
        out = self.encoder(hidden, layout, packed=False)
        return layout.unpad(out.view(layout.batch, layout.max_len, -1))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for prefix in _PREFIXES:
                    name = name.removeprefix(prefix)
                if not name.startswith(_SKIPPED):
                    yield name, tensor

        return load_by_rules(self, renamed(), self.weight_rules)
