"""Llama: RMSNorm, rotary, grouped-query attention, SwiGLU MLP; optionally tied head."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.layers.activation import GatedActivation
from tessellm.layers.attention import Attention
from tessellm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tessellm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding

# checkpoint name piece -> (our fused parameter piece, shard id)
STACKED_PARAMS = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class LlamaAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_size, heads, kv_heads, ctx, bias=bias
        )
        self.o_proj = RowParallelLinear(heads * head_size, config.hidden_size, ctx, bias=bias)
        self.rotary = RotaryEmbedding(config, head_size, config.max_position_embeddings)
        window = getattr(config, "sliding_window", None)
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_size,
            head_size**-0.5,
            self.qkv_proj.num_kv_heads,
            ctx,
            sliding_window=window,
        )
        self.head_size = head_size

    def forward(self, positions, hidden, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        t = hidden.shape[0]
        q, k = self.rotary(
            positions, q.reshape(t, -1, self.head_size), k.reshape(t, -1, self.head_size)
        )
        out = self.attn(q.reshape(t, q_size), k.reshape(t, kv_size), v, metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        size = config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], ctx, bias=bias
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, ctx, bias=bias)
        self.act = GatedActivation(getattr(config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, ctx)
        self.mlp = LlamaMLP(config, ctx)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype)

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ctx) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype)

    def forward(self, input_ids, positions, metadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, ctx: ModelContext) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids, positions, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        tied = getattr(self.config, "tie_word_embeddings", False)
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                continue
            for ckpt_piece, fused_piece, shard in STACKED_PARAMS:
                if f".{ckpt_piece}." in name:
                    target = name.replace(ckpt_piece, fused_piece)
                    param = params[target]
                    owner = self.get_submodule(target.rsplit(".", 1)[0])
                    owner.weight_loader(param, tensor.to(param.dtype), shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    continue
                param = params[name]
                owner = self.get_submodule(name.rsplit(".", 1)[0])
                loader = getattr(owner, "weight_loader", None)
                tensor = tensor.to(param.dtype)
                if loader is not None:
                    loader(param, tensor)
                else:
                    default_weight_loader(param, tensor)
                loaded.add(name)
        if tied:
            loaded.add("lm_head.weight")
        return loaded
