"""What a model keeps between steps, declared per layer (the model contract's cache specs).

A model class says, from its config alone (the engine lays the cache out before the model
is built, possibly in another process), what each of its caching layers needs:

- :class:`FullAttentionSpec`: paged KV over the whole context;
- :class:`SlidingWindowSpec`: paged KV of which only the last ``window`` positions are
  read, so blocks wholly outside the window go back to the pool while the request runs;
- :class:`RecurrentStateSpec`: fixed-size state tensors (a state-space layer's conv and SSM
  states), one slot per running request, whatever its length.

The attention specs, in order, describe the model's :class:`~tessellm.layers.attention.
Attention` modules in ``model.modules()`` order; the recurrent specs describe its
:class:`StatefulLayer` modules in that order. ``cache_specs(config)`` is an optional
classmethod of a model class: without it the config's usual fields decide
(:func:`config_cache_specs`, which ``ConfigAttentionRequirements`` also gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class FullAttentionSpec:
    """A layer attending over every earlier position."""


@dataclass(frozen=True, slots=True)
class SlidingWindowSpec:
    """A layer attending over the last ``window`` positions (a query at ``p`` reads keys
    ``k`` with ``p - k < window``)."""

    window: int


@dataclass(frozen=True, slots=True)
class RecurrentStateSpec:
    """Fixed-size per-request state: one tensor of each shape per running request (e.g. a
    Mamba layer's conv state ``(conv_dim, d_conv)`` and SSM state ``(heads, head_dim,
    d_state)``), in ``dtype`` (None: the model's dtype)."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype | None = None

    def bytes_per_slot(self, model_dtype: torch.dtype) -> int:
        elem = (self.dtype or model_dtype).itemsize
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n * elem
        return total


LayerCacheSpec = FullAttentionSpec | SlidingWindowSpec | RecurrentStateSpec


class StatefulLayer(nn.Module):
    """A layer with recurrent state. The model runner binds, once, one tensor per shape of
    ``state_spec`` with a leading slot dimension (``[num_slots, *shape]``); each step's
    ``AttentionMetadata.state_slots`` says which slot each sequence of the batch owns
    (``None`` on a scratch pass such as the profiling step: start from zeros, keep nothing).
    A sequence whose chunk starts at position 0 starts from a zero state."""

    state_spec: RecurrentStateSpec

    def bind_state(self, tensors: list[torch.Tensor]) -> None:
        self.state = tensors


def config_cache_specs(config: Any) -> list[LayerCacheSpec]:
    """One spec per decoder layer from the usual transformers fields: a sliding window on
    the layers ``layer_types`` / ``sliding_window`` / ``use_sliding_window`` window (as
    :func:`tessellm.layers.decoder_attention.layer_sliding_window` reads them), full
    attention elsewhere. Multimodal configs are read through their text config."""
    from tessellm.layers.decoder_attention import layer_sliding_window

    getter = getattr(config, "get_text_config", None)
    cfg = getter() if getter else config
    specs: list[LayerCacheSpec] = []
    for i in range(cfg.num_hidden_layers):
        window = layer_sliding_window(cfg, i)
        specs.append(SlidingWindowSpec(window) if window else FullAttentionSpec())
    return specs


def model_cache_specs(model_cls: type, config: Any) -> list[LayerCacheSpec]:
    """The specs ``model_cls`` declares for ``config`` (its ``cache_specs`` classmethod), or
    the config's reading for a class that declares none."""
    declared = getattr(model_cls, "cache_specs", None)  # optional member of the contract
    return list(declared(config)) if declared is not None else config_cache_specs(config)
