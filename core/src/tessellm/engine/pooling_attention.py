"""The attention backend of decoder families running as embedding models: no KV cache.

A decoder layer (``tessellm.layers.attention.Attention``) calls ``write_kv`` with this
step's keys and values, then ``forward`` with the query. Here nothing is written: the
pair is held in the step's ``metadata.extra`` until the same layer's ``forward`` takes it
and attends over the batch's own keys (``dense_attention``). This serves only steps in
which every sequence is computed whole, from position 0, which is every pooling step.
"""

from __future__ import annotations

import torch

from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
)
from tessellm.layers.dense_attention import dense_attention, padded_layout

_PENDING_KV = "pending_kv"


class NoCacheAttention(AttentionBackend):
    name = "pooling-dense"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"*"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    )

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        metadata.extra[_PENDING_KV] = (key, value)

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        key, value = metadata.extra.pop(_PENDING_KV)
        return dense_attention(
            query,
            key,
            value,
            padded_layout(metadata),
            causal=True,
            scale=scale,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )
