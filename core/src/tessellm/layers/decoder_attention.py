"""The decoder's self-attention: grouped KV heads, rotary positions, optional q/k norms.

``forward`` is ``attend(qkv_proj(hidden))``; a fused-op table may compute the projection
together with the norm before it (``DecoderLayer``) and then calls :meth:`attend`, so a
family that changes what happens after the projection overrides ``attend`` (kept fused),
and one that overrides ``forward`` runs its own ``forward`` (unfused).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.layers.attention import Attention
from tessellm.layers.linear import QKVParallelLinear, RowParallelLinear
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding


def layer_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The window layer ``layer_idx`` attends over, as transformers decides it.

    Configs with ``layer_types`` (Qwen2/Qwen3 derive it from ``max_window_layers``; Gemma
    alternates) window only their ``"sliding_attention"`` layers; otherwise every layer
    uses ``sliding_window`` unless ``use_sliding_window`` is false.
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window)


class DecoderAttention(nn.Module):
    """Self-attention with grouped KV heads and rotary positions."""

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        *,
        sliding_window: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        rotary: nn.Module | None = None,
        scale: float | None = None,
        logits_soft_cap: float | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        """``rotary`` replaces the full-head default table (partial rotary, per-layer-type
        bases, a table shared by layers); ``scale`` the ``head_size ** -0.5`` score scale
        (Granite's ``attention_multiplier``, Gemma's ``query_pre_attn_scalar ** -0.5``);
        ``norm_offset`` is the q/k norms' weight offset (1 for Gemma's ``1 + weight``)."""
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.head_size = head_size
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_size, heads, kv_heads, ctx, bias=qkv_bias
        )
        self.o_proj = RowParallelLinear(heads * head_size, config.hidden_size, ctx, bias=o_bias)
        # Qwen3's per-head norms: one weight of head_size shared by all heads.
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(head_size, eps, ctx.dtype, norm_offset) if qk_norm else None
        self.k_norm = RMSNorm(head_size, eps, ctx.dtype, norm_offset) if qk_norm else None
        if rotary is None:
            rotary = RotaryEmbedding(config, head_size, config.max_position_embeddings)
        self.rotary_emb = rotary
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_size,
            head_size**-0.5 if scale is None else scale,
            self.qkv_proj.num_kv_heads,
            ctx,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden), metadata)

    def attend(
        self, positions: torch.Tensor, qkv: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Everything after the q/k/v projection (``qkv`` is its output)."""
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        num_tokens = qkv.shape[0]
        if self.q_norm is not None and self.k_norm is not None:
            # Rows of one head each: the 2-D shape a fused norm kernel expects.
            q = self.q_norm(q.reshape(-1, self.head_size))
            k = self.k_norm(k.reshape(-1, self.head_size))
        q = q.reshape(num_tokens, -1, self.head_size)
        k = k.reshape(num_tokens, -1, self.head_size)
        # The attention layer rotates q and k (with the KV store, where a kernel fuses them).
        out = self.attn(q, k, v, metadata, positions=positions, rotary=self.rotary_emb)
        return self.o_proj(out)
