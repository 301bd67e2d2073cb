"""Decode attention from tensors alone, for a step that is exported and compiled once.

The backend's usual path plans each step on the host (``prepare``: groups, block lists,
whether blocks are consecutive), which a captured graph cannot redo per step. Under
tracing (``torch.compiler.is_compiling()``) the backend attends through this function:
every sequence has one query token, its context is read through its row of the block
table (``W`` blocks, ``W`` a dynamic dimension of the compiled step) and positions at or
past its length are masked. Inductor fuses the gather, the masking and the softmax into
a few loops; nothing is planned on the host.
"""

from __future__ import annotations

import torch


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
    inside (as the eager decode path computes it).

    Written as products and sums, not matmuls: inductor then reads each cached key and
    value where it lies, through the block table, inside its reduction loops. As batched
    matmuls (einsum) the gathered context is first copied out in fp32, per layer: at 16
    sequences of 2,048 tokens (SmolLM2's heads, two threads) 15 ms a layer, against 5.9 ms
    this way and 4.4 ms for the eager backend; at one sequence of 2,048 tokens 1.3 ms,
    0.44 ms and 1.4 ms."""
    num_seqs, num_heads, head_size = query.shape
    _, block_size, kv_heads, _ = k_cache.shape
    context = block_tables.shape[1] * block_size
    keys = k_cache[block_tables].view(num_seqs, context, kv_heads, 1, head_size)
    values = v_cache[block_tables].view(num_seqs, context, kv_heads, 1, head_size)
    # Every kv head's group of query heads at once: GQA without repeating K/V.
    grouped = query.view(num_seqs, 1, kv_heads, num_heads // kv_heads, head_size).float()
    scores = (grouped * keys.float()).sum(dim=-1) * scale  # [B, T, Hkv, G]
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    position = torch.arange(context, device=query.device)
    visible = position[None, :] < seq_lens[:, None]
    if sliding_window:
        visible &= position[None, :] >= seq_lens[:, None] - sliding_window
    scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
    probs = scores.softmax(dim=1)
    out = (probs[..., None] * values.float()).sum(dim=1)  # [B, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_size).to(query.dtype)
