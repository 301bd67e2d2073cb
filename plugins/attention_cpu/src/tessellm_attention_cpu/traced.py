"""Decode attention from tensors alone, for a step that is exported and compiled once.

The backend's usual path plans each step on the host (``prepare``: groups, block lists,
whether blocks are consecutive), which a captured graph cannot redo per step. Under
tracing (``torch.compiler.is_compiling()``) the backend uses these functions instead:
every sequence has one query token, its context is read through its row of the block
table (``W`` blocks, ``W`` a dynamic dimension of the compiled step) and positions at or
past its length are masked. Inductor fuses the gather, the masking and the softmax into
a few loops; nothing is planned on the host.
"""

from __future__ import annotations

import torch


def traced_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[B, Hkv, D]`` at ``slot_mapping`` (every slot valid)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def traced_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """One query token per sequence: ``query`` ``[B, H, D]`` → ``[B, H, D]``, in fp32
    inside (as the eager decode path computes it)."""
    num_seqs, num_heads, head_size = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    context = block_tables.shape[1] * block_size
    keys = k_cache[block_tables].view(num_seqs, context, kv_heads, head_size).float()
    values = v_cache[block_tables].view(num_seqs, context, kv_heads, head_size).float()
    # Every kv head's group of query heads at once: GQA without repeating K/V.
    grouped = query.view(num_seqs, kv_heads, num_heads // kv_heads, head_size).float()
    scores = torch.einsum("bkgd,btkd->bkgt", grouped, keys) * scale
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    position = torch.arange(context, device=query.device)
    visible = position[None, :] < seq_lens[:, None]
    if sliding_window:
        visible &= position[None, :] >= seq_lens[:, None] - sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bkgt,btkd->bkgd", probs, values)
    return out.reshape(num_seqs, num_heads, head_size).to(query.dtype)
