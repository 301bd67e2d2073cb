"""The attention layer models use: writes this step's K/V, then calls the backend.

The runner binds each layer's cache tensors explicitly (``bind_kv_cache``); nothing is
read from hidden global state. Given the rotary embedding, the layer also rotates q and k,
so that a fused kernel (``FusedOps.rotary_neox_write_kv``) can rotate and store the keys in
one pass.

With an fp8 cache (``kv_cache_dtype``) the layer hands the backend its per-layer
``k_scale``/``v_scale`` (1.0 unless the checkpoint carries them, as llm-compressor's fp8
checkpoints do: ``self_attn.k_scale``/``v_scale``, or one ``kv_scale`` for both; see
``load_kv_cache_scale``), and the fused rotary-and-write kernel, which knows no scales,
is not used.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata, is_fp8
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
        # Plain tensors, neither parameters (a checkpoint without them still loads
        # completely) nor buffers (the model's buffers are its rotary tables).
        self.k_scale = torch.ones((), dtype=torch.float32, device=ctx.device)
        self.v_scale = torch.ones((), dtype=torch.float32, device=ctx.device)
        self.kv_scales_from_checkpoint = False
        self._fp8_cache = False
        self.kv_group = 0  # set by the runner: which KV group's block table it reads

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self._fp8_cache = is_fp8(k_cache.dtype)

    def load_kv_scale(self, which: str, tensor: torch.Tensor) -> None:
        """Set ``k_scale``/``v_scale`` (``which``: "k", "v" or "kv") from a checkpoint."""
        # A scale per head or per channel has no place in a per-layer scale: the largest
        # keeps every value within the fp8 range (as vLLM reads such checkpoints).
        value = float(tensor.detach().float().abs().max())
        for name in ("k", "v") if which == "kv" else (which,):
            getattr(self, f"{name}_scale").fill_(value)
        self.kv_scales_from_checkpoint = True

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
        if self.kv_group:
            metadata = metadata.kv_groups[self.kv_group - 1]
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
            fused = ops.rotary_neox_write_kv if ops is not None and not self._fp8_cache else None
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
        self.backend.write_kv(k, v, self.k_cache, self.v_cache, metadata, **self._kv_scales())
        return self._attend(q, metadata)

    def _kv_scales(self) -> dict[str, torch.Tensor]:
        # Only an fp8 cache's backend takes scales (interfaces/attention.py).
        return {"k_scale": self.k_scale, "v_scale": self.v_scale} if self._fp8_cache else {}

    def _attend(self, q: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        out = self.backend.forward(
            q,
            self.k_cache,
            self.v_cache,
            metadata,
            scale=self.scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
            **self._kv_scales(),
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_size)


def num_kv_groups(attn_layers: list[Attention]) -> int:
    """How many KV groups (block tables) a step carries for these layers
    (``Attention.kv_group``: 0 is the step's own table, 1.. its ``kv_groups``)."""
    return 1 + max((layer.kv_group for layer in attn_layers), default=0)


# Checkpoint names of per-layer KV cache scales, under the attention block's prefix.
_KV_SCALE_NAME = re.compile(r"^(?P<prefix>.+)\.(?P<which>k|v|kv)_scale$")


def load_kv_cache_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Load a checkpoint's ``<attention block>.k_scale``/``v_scale``/``kv_scale`` (names
    that match no parameter) into the :class:`Attention` of that block; False when
    ``name`` is no such scale."""
    match = _KV_SCALE_NAME.match(name)
    if match is None:
        return False
    try:
        block = model.get_submodule(match["prefix"])
    except AttributeError:
        return False
    layers = [block] if isinstance(block, Attention) else []
    layers = layers or [m for m in block.children() if isinstance(m, Attention)]
    if len(layers) != 1:
        return False
    layers[0].load_kv_scale(match["which"], tensor)
    return True
