"""How a model's per-layer cache specs become block tables and state slots.

Attention layers are put in **KV groups**; each group has its own block table per request,
and all groups draw their blocks ("pages") from one pool. The layers of a group sit at
tensor positions ``0 .. group_size - 1``, and position ``k`` is one cache tensor
``[num_pages, block_size, kv_heads, head_size]`` shared by the ``k``-th layer of every
group: a page handed to group ``g`` holds the KV of ``g``'s layers only, so a page costs
``group_size`` layers' worth of memory whichever group holds it (vLLM's hybrid allocator
layout). A model with one kind of attention has one group of all its layers (the layout
every model had before: a page is a block of every layer).

A model mixing full and windowed layers (Gemma 2/3, Qwen with ``max_window_layers``) gets
``group_size`` = the smallest count of layers of one kind, and each kind is cut into
groups of that size (the last one may be shorter, its unused positions wasted): Gemma 3
270M's 3 full and 15 windowed layers make one full group and five windowed groups of 3. A
windowed group holds only the pages of the last ``window`` positions of a request; the
full group holds all of them. ``disable_hybrid_kv_cache_manager`` (vLLM's name) puts every
attention layer in one group instead; then windowed layers free nothing unless every layer
has the same window (Mistral), where the one table frees its old pages.

Recurrent layers need no pages: each running request holds one state slot (``max_num_seqs``
slots, reserved before the pages are counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessellm.interfaces.cache_spec import (
    FullAttentionSpec,
    LayerCacheSpec,
    RecurrentStateSpec,
    SlidingWindowSpec,
    model_cache_specs,
)


@dataclass(frozen=True, slots=True)
class KVGroup:
    """Attention layers sharing one block table. ``layers``: indices among the model's
    attention layers (module order); ``window``: the window they all use (None: full
    attention, or a table kept whole)."""

    layers: tuple[int, ...]
    window: int | None = None


@dataclass(frozen=True, slots=True)
class CacheLayout:
    groups: tuple[KVGroup, ...]  # group 0's table is Request.block_ids
    group_size: int  # cache tensors per page position (0: no attention layers)
    state_specs: tuple[RecurrentStateSpec, ...] = ()
    num_state_slots: int = 0

    @property
    def has_state(self) -> bool:
        return bool(self.state_specs)

    @property
    def frees_blocks(self) -> bool:
        return any(g.window is not None for g in self.groups)

    @property
    def plain(self) -> bool:
        """One table, nothing freed, no state: what every manager and runner serves."""
        return len(self.groups) == 1 and not self.frees_blocks and not self.has_state

    @property
    def single_table(self) -> bool:
        """One block table and no state: what graph and step runners serve (a table whose
        old blocks point at the null page is still one table)."""
        return len(self.groups) == 1 and not self.has_state

    def group_of_layer(self) -> dict[int, tuple[int, int]]:
        """attention layer index -> (group, tensor position)."""
        return {
            layer: (g, k)
            for g, group in enumerate(self.groups)
            for k, layer in enumerate(group.layers)
        }

    def pages_per_request(self, num_tokens: int, block_size: int) -> int:
        """Pages one request of ``num_tokens`` tokens holds while decoding."""
        full = -(-num_tokens // block_size)
        return sum(
            full if g.window is None else min(full, window_blocks(g.window, block_size))
            for g in self.groups
        )


def window_blocks(window: int, block_size: int) -> int:
    """The most blocks a window's positions span at once (one more where unaligned)."""
    return -(-(window - 1) // block_size) + 1


def build_layout(
    specs: list[LayerCacheSpec], hybrid: bool = True, num_state_slots: int = 0
) -> CacheLayout:
    """The groups for ``specs`` (see the module docstring); ``hybrid=False``: one group."""
    windows: list[int | None] = []
    state_specs: list[RecurrentStateSpec] = []
    for spec in specs:
        if isinstance(spec, RecurrentStateSpec):
            state_specs.append(spec)
        elif isinstance(spec, SlidingWindowSpec):
            windows.append(int(spec.window))
        elif isinstance(spec, FullAttentionSpec):
            windows.append(None)
        else:
            raise TypeError(f"unknown layer cache spec {spec!r}")
    slots = num_state_slots if state_specs else 0
    kinds: dict[int | None, list[int]] = {}
    for i, window in enumerate(windows):
        kinds.setdefault(window, []).append(i)
    if len(kinds) <= 1 or not hybrid:
        only = next(iter(kinds)) if len(kinds) == 1 else None
        group = KVGroup(tuple(range(len(windows))), only)
        return CacheLayout((group,), len(windows), tuple(state_specs), slots)
    size = min(len(layers) for layers in kinds.values())
    # Full attention first (group 0 is the table that spans the whole context), then the
    # windows from the narrowest.
    order = sorted(kinds, key=lambda w: (w is not None, w or 0))
    groups = tuple(
        KVGroup(tuple(kinds[w][i : i + size]), w)
        for w in order
        for i in range(0, len(kinds[w]), size)
    )
    return CacheLayout(groups, size, tuple(state_specs), slots)


def hybrid_enabled(args: Any, kv_manager_supports_layouts: bool = True) -> bool:
    # read with a default: the field is new in EngineArgs
    return kv_manager_supports_layouts and not getattr(
        args, "disable_hybrid_kv_cache_manager", False
    )


def layout_for(plugins: Any, config: Any, args: Any) -> CacheLayout:
    """The layout of ``config``'s registered model class under ``args`` (the engine and
    every worker compute it alike)."""
    from tessellm import model_loader as ml

    specs = model_cache_specs(ml.model_class(plugins, config), config)
    return build_layout(specs, hybrid_enabled(args), args.max_num_seqs)


def check_layout_support(kv_cls: type, layout: CacheLayout, args: Any) -> None:
    """Refuse, before the model loads, what the manager or the engine cannot serve."""
    from tessellm.errors import ConfigError

    if layout.has_state and args.speculative_config is not None:
        raise ConfigError(
            "speculative decoding needs to roll back rejected drafts, which recurrent "
            "(state-space) layers cannot; leave speculative_config unset for this model"
        )
    if layout.plain or kv_cls.supports_cache_layouts or _is_default_manager(kv_cls):
        return
    hint = (
        ""
        if layout.has_state
        else "; or start the engine with disable_hybrid_kv_cache_manager=True"
    )
    raise ConfigError(
        f"KV cache manager {kv_cls.__name__} does not declare supports_cache_layouts, which "
        f"this model's cache layout needs (several KV groups, windowed blocks freed, or "
        f"recurrent state){hint}"
    )


def _is_default_manager(kv_cls: type) -> bool:
    from tessellm.engine.kv_cache_manager import KVCacheManager

    return kv_cls is KVCacheManager


def make_kv_cache_manager(kv_cls: type, num_blocks: int, args: Any, layout: CacheLayout) -> Any:
    """The manager for ``layout``: ``kv_cls`` as before for a plain layout, else with the
    layout (the default manager's hybrid form where ``kv_cls`` is the default)."""
    if layout.plain:
        return kv_cls(num_blocks, args.block_size, args.enable_prefix_caching)
    if _is_default_manager(kv_cls):
        from tessellm.engine.hybrid_kv_cache_manager import HybridKVCacheManager

        kv_cls = HybridKVCacheManager
    return kv_cls(num_blocks, args.block_size, args.enable_prefix_caching, layout=layout)


def pages_needed(layout: CacheLayout, args: Any, max_model_len: int) -> int:
    """Pages beyond which more are wasted: ``max_num_seqs`` requests at full length (and
    the null page of a layout that frees blocks)."""
    per_request = layout.pages_per_request(max_model_len, args.block_size)
    return args.max_num_seqs * per_request + 1 + int(layout.frees_blocks)
