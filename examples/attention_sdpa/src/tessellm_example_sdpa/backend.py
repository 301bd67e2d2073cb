"""Paged attention through ``torch.nn.functional.scaled_dot_product_attention``.

For each sequence the keys and values of its context are gathered from the paged KV cache
through its block table, then SDPA attends the sequence's query rows to them with a mask
that encodes causality (the query rows are the last positions of the context) and, for
layers that have one, the sliding window. SDPA has no logit soft-capping, so the backend
does not claim it and the engine picks another backend for models that need it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[seq_len, num_kv_heads, head_size]``: one sequence's cached keys or values.

    ``cache`` is ``[num_blocks, block_size, num_kv_heads, head_size]``; position ``p`` of
    the sequence lives in block ``block_table[p // block_size]`` at offset
    ``p % block_size``."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:seq_len]


def context_mask(
    query_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """``[query_len, seq_len]``, True where a query row may attend to a key position."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed &= (q_pos - k_pos) < sliding_window
    return allowed


class SdpaPagedAttention(AttentionBackend):
    name = "sdpa"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        sliding_window=True,
        logits_soft_cap=False,
    )

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        slots = metadata.slot_mapping
        keep = slots >= 0  # -1: a padding token, not stored
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        k_cache.flatten(0, 1).index_copy_(0, slots, key.to(k_cache.dtype))
        v_cache.flatten(0, 1).index_copy_(0, slots, value.to(v_cache.dtype))

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
        if logits_soft_cap:
            raise ValueError("sdpa has no logit soft-capping (validate refuses such models)")
        out = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu.tolist()
        for i, seq_len in enumerate(metadata.seq_lens_cpu.tolist()):
            lo, hi = starts[i], starts[i + 1]
            if hi == lo:
                continue
            k = gather_context(k_cache, metadata.block_tables[i], seq_len)
            v = gather_context(v_cache, metadata.block_tables[i], seq_len)
            mask = context_mask(hi - lo, seq_len, sliding_window, query.device)
            # SDPA takes [batch, heads, tokens, head_size]; enable_gqa lets several query
            # heads share each KV head.
            attended = F.scaled_dot_product_attention(
                query[lo:hi].transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
            out[lo:hi] = attended.squeeze(0).transpose(0, 1)
        return out
