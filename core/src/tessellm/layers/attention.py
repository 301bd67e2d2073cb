"""The attention layer models use: writes this step's K/V, then calls the backend.

The runner binds each layer's cache tensors explicitly (``bind_kv_cache``); nothing is
read from hidden global state. Given the rotary embedding, the layer also rotates q and k,
so that a fused kernel (``FusedOps.rotary_neox_write_kv``) can rotate and store the keys in
one pass.
"""

from __future__ import annotations

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.interfaces.ops import FusedOps
from tessellm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        ctx: ModelContext,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window or None
        self.logits_soft_cap = logits_soft_cap or None
        self.backend = ctx.attention
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        positions: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """``q`` ``[T, H*D]``, ``k``/``v`` ``[T, Hkv*D]`` (or the same as ``[T, heads, D]``)
        → ``[T, H*D]``; with ``rotary``, q and k are rotated by ``positions`` first."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_size)
        k = k.view(num_tokens, self.num_kv_heads, self.head_size)
        v = v.view(num_tokens, self.num_kv_heads, self.head_size)
        ops = self.fused_ops
        if rotary is not None:
            if positions is None:
                raise ValueError("rotary needs the tokens' positions")
            # The kernel rotates as RotaryEmbedding does and stores in the shared cache
            # layout (interfaces/attention.py), which every backend's write_kv keeps.
            fused = ops.rotary_neox_write_kv if ops is not None else None
            if fused is not None and isinstance(rotary, RotaryEmbedding) and rotary.fusable:
                q = fused(
                    positions,
                    q,
                    k,
                    v,
                    rotary.cos,
                    rotary.sin,
                    self.k_cache,
                    self.v_cache,
                    metadata.slot_mapping,
                )
                return self._attend(q, metadata)
            q, k = rotary(positions, q, k)
        self.backend.write_kv(k, v, self.k_cache, self.v_cache, metadata)
        return self._attend(q, metadata)

    def _attend(self, q: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        out = self.backend.forward(
            q,
            self.k_cache,
            self.v_cache,
            metadata,
            scale=self.scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_size)
