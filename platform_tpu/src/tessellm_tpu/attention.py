"""Paged attention for XLA: static shapes, the KV cache updated in place.

Cache layout (this backend's own, set up by the XLA step runner): one tensor per layer,
``kv [num_blocks + 1, block_size, 2 * num_kv_heads, head_size]``, keys and values
interleaved per head (``kv[..., 0::2, :]`` are the keys, ``1::2`` the values), which is
the layout of torch-xla's ragged paged attention kernel. The layer binds it as both its
``k_cache`` and its ``v_cache``. The extra block is scratch: padding tokens write there.

Two forms of the attention itself:

- on a TPU with torch-xla's Pallas kernels (JAX installed), ``ragged_paged_attention``
  reads the pages through the block table for the real tokens only;
- elsewhere (XLA's CPU device, which is how CI runs this), a gather through the block
  table followed by masked attention: each token gathers its sequence's
  ``blocks x block_size`` keys and values and attends to those at or before its
  position (and within the sliding window). Cost and memory are ``tokens x context``
  per layer, which the step runner's context buckets keep near the longest real context.

Both read only device tensors: a step traces to the same program for every batch of
one padded shape. The metadata's ``extra`` carries ``positions`` and ``token_seq``
(each token's sequence row) for the gather, and ``num_seqs`` for the kernel.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
)


@cache
def ragged_kernel_available() -> bool:
    """torch-xla's Pallas ragged paged attention runs on a TPU only, and needs JAX."""
    if os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
        return False
    if importlib.util.find_spec("jax") is None:
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def interleave_kv(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[T, Hkv, D]`` keys and values as ``[T, 2 * Hkv, D]`` rows of the cache layout."""
    tokens, heads, size = key.shape
    return torch.stack((key, value), dim=2).reshape(tokens, 2 * heads, size)


def gather_attention(
    query: torch.Tensor,
    kv: torch.Tensor,
    block_tables: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, H, D]`` over the cache, in fp32: token ``t``
    reads the blocks of row ``token_seq[t]`` of ``block_tables`` ``[S, W]`` and sees the
    keys at positions ``<= positions[t]``."""
    tokens, num_heads, head_size = query.shape
    blocks, block_size, combined = kv.shape[0], kv.shape[1], kv.shape[2]
    num_kv_heads = combined // 2
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    context = width * block_size
    table = block_tables.index_select(0, token_seq).reshape(-1)
    pages = kv.view(blocks, block_size * combined * head_size).index_select(0, table)
    pages = pages.view(tokens, context, num_kv_heads, 2, head_size).float()
    k, v = pages[:, :, :, 0], pages[:, :, :, 1]
    q = query.float().view(tokens, num_kv_heads, group, head_size)
    scores = torch.einsum("thgd,tlhd->thgl", q, k) * scale
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    key_positions = torch.arange(context, device=query.device, dtype=positions.dtype)
    allowed = key_positions[None, :] <= positions[:, None]
    if sliding_window:
        allowed &= (positions[:, None] - key_positions[None, :]) < sliding_window
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("thgl,tlhd->thgd", probs, v)
    return out.reshape(tokens, num_heads, head_size).to(query.dtype)


class XlaPagedAttention(AttentionBackend):
    name = "xla"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"xla"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    )

    def write_kv(self, key, value, k_cache, v_cache, metadata: AttentionMetadata) -> None:
        # One scatter into the cache tensor itself: XLA aliases the updated cache to the
        # program's input buffer (no copy of the cache per step).
        rows = interleave_kv(key, value).to(k_cache.dtype)
        block_size = k_cache.shape[1]
        slots = metadata.slot_mapping.long()
        k_cache.index_put_((slots // block_size, slots % block_size), rows)

    def forward(
        self,
        query,
        k_cache,
        v_cache,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        if ragged_kernel_available():
            from torch_xla.experimental.custom_kernel import ragged_paged_attention

            return ragged_paged_attention(
                query,
                k_cache,
                metadata.seq_lens,
                metadata.block_tables,
                metadata.query_start_loc,
                metadata.extra["num_seqs"],
                sm_scale=scale,
                sliding_window=sliding_window,
                soft_cap=logits_soft_cap,
            )
        return gather_attention(
            query,
            k_cache,
            metadata.block_tables,
            metadata.extra["token_seq"],
            metadata.extra["positions"],
            scale=scale,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )
