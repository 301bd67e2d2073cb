"""Attention over a packed batch of whole sequences, with no KV cache: the pooling path.

A pooling request runs once over its whole prompt and keeps nothing, so its attention
needs no paged cache: the packed tokens (``[T, heads, D]``, sequences back to back as
``AttentionMetadata.query_start_loc_cpu`` says) are padded to ``[B, heads, L, D]`` and go
through torch's ``scaled_dot_product_attention``. Encoders attend both ways (padded keys
masked out); decoders causally, where right padding needs no mask (a real query never
reaches past its own position). The layout is built once per forward and shared by every
layer through ``metadata.extra``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tessellm.interfaces.attention import AttentionMetadata

_LAYOUT_KEY = "padded_layout"


@dataclass(slots=True)
class PaddedLayout:
    """Where each packed token sits in the padded ``[B, L]`` grid."""

    seq_lens: list[int]
    max_len: int
    # Row of each packed token in the flattened grid; None when every sequence has L tokens.
    rows: torch.Tensor | None
    # True at real tokens, [B, 1, 1, L]; None when there is no padding.
    key_mask: torch.Tensor | None

    @property
    def batch(self) -> int:
        return len(self.seq_lens)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` → ``[B, L, ...]`` (zeros at padding)."""
        rest = x.shape[1:]
        if self.rows is None:
            return x.view(self.batch, self.max_len, *rest)
        out = x.new_zeros(self.batch * self.max_len, *rest)
        out[self.rows] = x
        return out.view(self.batch, self.max_len, *rest)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` → ``[T, ...]``."""
        flat = y.reshape(self.batch * self.max_len, *y.shape[2:])
        return flat if self.rows is None else flat[self.rows]


def padded_layout(metadata: AttentionMetadata) -> PaddedLayout:
    """The batch's layout, built on first use and kept in ``metadata.extra``."""
    layout = metadata.extra.get(_LAYOUT_KEY)
    if layout is None:
        starts = metadata.query_start_loc_cpu.tolist()
        lens = [b - a for a, b in itertools.pairwise(starts)]
        longest = max(lens)
        device = metadata.query_start_loc.device
        rows = key_mask = None
        if any(n != longest for n in lens):
            lens_t = torch.tensor(lens)
            seq = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
            offset = torch.arange(int(lens_t.sum())) - torch.tensor(starts[:-1])[seq]
            rows = (seq * longest + offset).to(device)
            key_mask = (torch.arange(longest)[None, :] < lens_t[:, None]).to(device)
            key_mask = key_mask[:, None, None, :]
        layout = PaddedLayout(lens, longest, rows, key_mask)
        metadata.extra[_LAYOUT_KEY] = layout
    return layout


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PaddedLayout,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` → ``[T, H, D]``: each sequence's
    queries over its own keys (``causal``: keys at or before the query; a window ``W``
    keeps the last ``W`` of them; a soft-cap ``c`` maps scores to ``c * tanh(s / c)``)."""
    out = padded_attention(
        layout.pad(q),
        layout.pad(k),
        layout.pad(v),
        layout,
        causal=causal,
        scale=scale,
        sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap,
    )
    return layout.unpad(out)


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PaddedLayout,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """:func:`dense_attention` over inputs already in the padded grid: ``q``
    ``[B, L, H, D]``, ``k``/``v`` ``[B, L, Hkv, D]`` → ``[B, L, H, D]`` (rows at padding
    hold values of no use). An encoder keeps its states padded from layer to layer and
    calls this, sparing a pad and an unpad per layer."""
    heads, kv_heads = q.shape[2], k.shape[2]
    qp, kp, vp = (t.transpose(1, 2) for t in (q, k, v))
    if kv_heads != heads:
        kp = kp.repeat_interleave(heads // kv_heads, dim=1)
        vp = vp.repeat_interleave(heads // kv_heads, dim=1)
    mask = None if causal else layout.key_mask
    if causal and (sliding_window or logits_soft_cap):
        mask = _causal_mask(layout.max_len, sliding_window, q.device)
    if logits_soft_cap:
        scores = torch.matmul(qp, kp.transpose(-1, -2)).float() * scale
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(vp.dtype), vp)
    else:
        plain_causal = causal and mask is None
        out = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=mask, is_causal=plain_causal, scale=scale
        )
    return out.transpose(1, 2)


def _causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    mask = key <= query
    if window:
        mask &= query - key < window
    return mask
