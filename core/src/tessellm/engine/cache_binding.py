"""The model runner's side of the cache layout (``engine/cache_layout.py``): page and state
sizes, the cache tensors bound to the layers, and each step's per-group metadata."""

from __future__ import annotations

import dataclasses
import itertools
import math
import mmap
from typing import TYPE_CHECKING

import numpy as np
import torch

from tessellm.engine.cache_layout import CacheLayout, layout_for
from tessellm.engine.transfer import to_device
from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.cache_spec import StatefulLayer
from tessellm.interfaces.schedule import ScheduledSeq

if TYPE_CHECKING:
    from tessellm.engine.model_runner import ModelRunner

# A pure-recurrent model's "pages" hold nothing; the engine caps their count anyway.
UNBOUNDED_PAGES = 1 << 30


def runner_layout(runner: ModelRunner) -> CacheLayout:
    """The layout, checked against the built model: as many attention layers as specs,
    each with the window its spec says, and as many stateful layers as state specs."""
    layout = layout_for(runner._plugins, runner.config, runner.args)
    runner.stateful_layers = [m for m in runner.model.modules() if isinstance(m, StatefulLayer)]
    name = type(runner.model).__name__
    if len(runner.stateful_layers) != len(layout.state_specs):
        raise ModelLoadError(
            f"{name} declares {len(layout.state_specs)} recurrent layers in cache_specs but "
            f"has {len(runner.stateful_layers)} StatefulLayer modules"
        )
    if layout.plain:
        return layout
    layers = runner.attn_layers
    declared = sum(len(g.layers) for g in layout.groups)
    if declared != len(layers):
        raise ModelLoadError(
            f"{name} declares {declared} attention layers in cache_specs but has "
            f"{len(layers)} Attention modules"
        )
    for g, group in enumerate(layout.groups):
        for k, index in enumerate(group.layers):
            layer = layers[index]
            if group.window is not None and layer.sliding_window != group.window:
                raise ModelLoadError(
                    f"{name}: attention layer {index} has window {layer.sliding_window}, "
                    f"its cache spec says {group.window}"
                )
            first = layers[layout.groups[0].layers[min(k, len(layout.groups[0].layers) - 1)]]
            if (layer.num_kv_heads, layer.head_size) != (first.num_kv_heads, first.head_size):
                raise ModelLoadError(
                    f"{name}: attention layers of different KV shapes share a page position; "
                    "start the engine with disable_hybrid_kv_cache_manager=True"
                )
            layer.kv_group = g
    return layout


def _position_shapes(runner: ModelRunner) -> list[tuple[int, int]]:
    """(kv heads, head size) of each page position's cache tensor."""
    layout, layers = runner.cache_layout, runner.attn_layers
    shapes: dict[int, tuple[int, int]] = {}
    for group in layout.groups:
        for k, index in enumerate(group.layers):
            shapes.setdefault(k, (layers[index].num_kv_heads, layers[index].head_size))
    return [shapes[k] for k in range(len(shapes))]


def page_bytes(runner: ModelRunner) -> int:
    """Bytes of one page: one block at every page position (every layer, for one group)."""
    elem = runner.kv_cache_dtype.itemsize
    return sum(2 * h * d for h, d in _position_shapes(runner)) * runner.block_size * elem


def state_bytes(runner: ModelRunner) -> int:
    layout = runner.cache_layout
    per_slot = sum(spec.bytes_per_slot(runner.dtype) for spec in layout.state_specs)
    return per_slot * layout.num_state_slots


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; in host memory one whose pages the kernel zeroes on first touch.

    ``torch.zeros`` writes every byte of a host tensor up front: the CPU's default 4 GiB
    KV cache took 3.1 s of a 12 s server start (2-core EPYC) and was all resident before
    the first request. An anonymous mapping reads as zeros and costs nothing until used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    if nbytes < mmap.PAGESIZE or anonymous is None:
        return torch.zeros(shape, dtype=dtype)
    # Private: a forked child gets copy-on-write pages, as with any other host memory.
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | anonymous)  # kept by the tensor
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


def bind_caches(runner: ModelRunner, num_pages: int) -> None:
    """Allocate the page tensors and state slots and bind them to the layers."""
    layout, dtype, device = runner.cache_layout, runner.kv_cache_dtype, runner.device
    tensors = []
    for h, d in _position_shapes(runner):
        shape = (num_pages, runner.block_size, h, d)
        tensors.append((zeroed(shape, dtype, device), zeroed(shape, dtype, device)))
    if layout.plain:
        for layer, (k, v) in zip(runner.attn_layers, tensors, strict=True):
            layer.bind_kv_cache(k, v)
    else:
        for group in layout.groups:
            for position, index in enumerate(group.layers):
                runner.attn_layers[index].bind_kv_cache(*tensors[position])
    for layer, spec in zip(runner.stateful_layers, layout.state_specs, strict=True):
        state_dtype = spec.dtype or runner.dtype
        layer.bind_state(
            [zeroed((layout.num_state_slots, *shape), state_dtype, device) for shape in spec.shapes]
        )


def _table(rows: list[list[int]]) -> np.ndarray:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum())
    )
    table = np.zeros((len(rows), max(1, int(lengths.max()))), dtype=np.int32)
    table[np.arange(table.shape[1]) < lengths[:, None]] = flat
    return table


def add_layout_metadata(
    runner: ModelRunner,
    metadata: AttentionMetadata,
    seqs: list[ScheduledSeq],
    seq_index: np.ndarray,
    positions: np.ndarray,
) -> None:
    """Per-group block tables and slot mappings, and the state slots, for this step."""
    layout, dev, bs = runner.cache_layout, runner.device, runner.block_size
    groups = []
    for g in range(1, len(layout.groups)):
        table = _table([s.group_block_ids[g - 1] for s in seqs])
        slots = table[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        group = dataclasses.replace(
            metadata,
            block_tables=to_device(torch.from_numpy(table), dev),
            slot_mapping=to_device(torch.from_numpy(slots), dev),
            extra={},
        )
        runner.attention.prepare(group)
        groups.append(group)
    metadata.kv_groups = tuple(groups)
    if layout.has_state:
        state = torch.tensor([s.state_slot for s in seqs], dtype=torch.int64)
        metadata.state_slots = to_device(state, dev)
