"""Rotary position embeddings (RoPE) with the scaling variants transformers knows.

The inverse frequencies come from transformers' own rope initialisers (linear, dynamic,
yarn, longrope, llama3 ...), so every scaling type a config can name is computed exactly
as the reference does.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.ops import FusedOps, runs_methods_of


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope settings as one dict (transformers 5 ``rope_parameters`` or older)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    if isinstance(params, dict) and params:  # per-layer-type dicts (Gemma 3)
        return dict(next(iter(params.values())))
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    legacy.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    legacy.setdefault("rope_type", legacy.get("type", "default"))
    return legacy


def inverse_frequencies(
    config: Any, rotary_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None)
    nested = isinstance(params, dict) and bool(params) and "rope_theta" not in params
    if nested and layer_type not in params:
        # Per-layer-type settings (Gemma 3) and no type asked for: use the first type's,
        # and tell transformers' initialisers which one, since they index by it.
        layer_type = next(iter(params))
    if layer_type is not None and isinstance(params, dict) and layer_type in params:
        rope = dict(params[layer_type])
    else:
        rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = float(rope["rope_theta"])
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS[rope_type]
    try:
        inv_freq, scaling = init(config, torch.device("cpu"), layer_type=layer_type)
    except TypeError:
        inv_freq, scaling = init(config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


# cos/sin tables by everything that determines them. Every layer of a model has the same
# table (Llama-3-8B: 2 x 8192 x 64 fp32 = 4 MB, 134 MB if each of 32 layers kept its own),
# so layers built with the same settings share the tensors. Weak values: a table lives as
# long as some layer holds it as a buffer, and a freed model frees its tables.
_TABLES: weakref.WeakValueDictionary[tuple[Any, ...], torch.Tensor] = weakref.WeakValueDictionary()


def cos_sin_tables(
    inv_freq: torch.Tensor, scaling: float, max_position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``position * inv_freq`` times ``scaling``, each fp32
    ``[max_position, len(inv_freq)]`` on the default device (models are built under one);
    the same two tensors for every call with the same settings while they are in use."""
    device = torch.empty(0).device
    key = (inv_freq.double().cpu().numpy().tobytes(), float(scaling), max_position, str(device))
    cos, sin = _TABLES.get((*key, "cos")), _TABLES.get((*key, "sin"))
    if cos is None or sin is None:
        t = torch.arange(max_position, dtype=torch.float32, device=device)
        # inv_freq may come back on the CPU from transformers' initialisers.
        freqs = torch.outer(t, inv_freq.to(device=device, dtype=torch.float32))
        cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
        _TABLES[(*key, "cos")], _TABLES[(*key, "sin")] = cos, sin
    return cos, sin


class RotaryEmbedding(nn.Module):
    """Applies RoPE (neox style: the two halves of each head rotate) to q and k."""

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        config: Any,
        head_size: int,
        max_position: int,
        rotary_dim: int | None = None,
        layer_type: str | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim or head_size
        self.interleaved = interleaved
        inv_freq, scaling = inverse_frequencies(config, self.rotary_dim, layer_type)
        cos, sin = cos_sin_tables(inv_freq, scaling, max_position)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out

    @property
    def whole_head_neox(self) -> bool:
        """Neox style over the whole head: the form the fused rotary kernels compute."""
        return not self.interleaved and self.rotary_dim == self.head_size

    @property
    def fusable(self) -> bool:
        """Whether a fused neox rotary computes what ``forward`` does: the whole-head form,
        and a class that keeps this one's rotation (a subclass may change the tables)."""
        return self.whole_head_neox and runs_methods_of(self, RotaryEmbedding, "forward", "_rotate")

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` rotated by their ``positions``."""
        ops = self.fused_ops
        if ops is not None and ops.rotary_neox is not None and self.fusable:
            return ops.rotary_neox(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
