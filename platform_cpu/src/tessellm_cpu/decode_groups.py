"""KV groups in a compiled step: one block table and slot mapping per group.

A model whose windowed layers keep their KV in tables of their own (Gemma 2/3, Qwen with
windows: ``engine/cache_layout.py``, KV groups over one page pool) has ``group_size`` K/V
tensor pairs, the ``k``-th shared by the ``k``-th layer of every group, and each step one
block table and slot mapping per group (``AttentionMetadata.kv_groups``). A library takes:

- each distinct cache tensor once, every layer binding its own by index. Passing a shared
  tensor once per layer would make aliased inputs the exporter treats as independent:
  one layer's writes would be invisible to the next layer on the same tensor, and the
  copies back of the written inputs would overwrite each other's pages;
- group 0's table and slot mapping where a one-table library has them, and the tables
  and slot mappings of groups 1.. after the weights, each table with a width of its own.

So a model of one group (any model with ``disable_hybrid_kv_cache_manager=True``, or one
kind of attention) keeps the inputs it had; inside the step each layer reads its group's
metadata as the eager path does (``Attention.kv_group``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.layers.attention import Attention


@dataclass(frozen=True, slots=True)
class CacheInputs:
    """The caches a library takes and which of them each attention layer reads."""

    caches: list[torch.Tensor]  # distinct K and V tensors, in the order of first use
    layer_caches: tuple[tuple[int, int], ...]  # per attention layer: its K's, V's index
    num_groups: int  # KV groups (1: one block table)

    def bind(self, attn_layers: list[Attention], caches: list[torch.Tensor]) -> None:
        """Bind ``caches`` (the library's cache inputs) to the layers."""
        for layer, (k, v) in zip(attn_layers, self.layer_caches, strict=True):
            layer.bind_kv_cache(caches[k], caches[v])

    def layout_facts(self, attn_layers: list[Attention]) -> list[list[int]] | None:
        """Each layer's group and cache indices, for the library key (None for one group:
        its libraries' keys stay what they were)."""
        if self.num_groups == 1:
            return None
        return [
            [layer.kv_group, k, v]
            for layer, (k, v) in zip(attn_layers, self.layer_caches, strict=True)
        ]


def cache_inputs(attn_layers: list[Attention]) -> CacheInputs:
    """The layers' caches, each tensor once, and the number of KV groups they read."""
    index: dict[int, int] = {}
    caches: list[torch.Tensor] = []
    layer_caches = []
    for layer in attn_layers:
        pair = []
        for tensor in (layer.k_cache, layer.v_cache):
            if id(tensor) not in index:
                index[id(tensor)] = len(caches)
                caches.append(tensor)
            pair.append(index[id(tensor)])
        layer_caches.append((pair[0], pair[1]))
    num_groups = 1 + max((layer.kv_group for layer in attn_layers), default=0)
    return CacheInputs(caches, tuple(layer_caches), num_groups)


def group_metadata(
    metadata: AttentionMetadata, tables: list[torch.Tensor], slots: list[torch.Tensor]
) -> tuple[AttentionMetadata, ...]:
    """Groups 1..'s metadata inside the step: the batch of ``metadata`` with each group's
    table and slot mapping (no host plan: a traced backend reads tensors only)."""
    return tuple(
        dataclasses.replace(metadata, block_tables=table, slot_mapping=slot, extra={})
        for table, slot in zip(tables, slots, strict=True)
    )


def step_inputs(metadata: AttentionMetadata, num_groups: int) -> list[torch.Tensor] | None:
    """Groups 1..'s tables, then their slot mappings, from a step's metadata; None when
    the step does not carry the model's groups (it then runs eagerly)."""
    groups = metadata.kv_groups
    if len(groups) != num_groups - 1:
        return None
    return [g.block_tables for g in groups] + [g.slot_mapping for g in groups]


def example_inputs(
    num_groups: int,
    batch: int,
    tokens: int,
    seq_dim: torch.export.Dim | None,
    token_dim: object,
    taken: set[int],
) -> tuple[tuple, tuple]:
    """Example tables and slot mappings of groups 1.. for the export, and their dynamic
    shapes. Each table's width is a dimension of its own, traced with a size unlike every
    other dynamic dimension's (``taken``): equal example sizes could be unified."""
    widths = []
    size = 4
    while len(widths) < num_groups - 1:
        if size not in taken:
            widths.append(size)
        size += 1
    tables = [torch.zeros(batch, w, dtype=torch.int32) for w in widths]
    slots = [torch.arange(tokens, dtype=torch.int64) for _ in widths]
    table_dims = [
        {0: seq_dim, 1: torch.export.Dim(f"group{g}_table_width", min=1, max=1 << 20)}
        for g in range(1, num_groups)
    ]
    return (tables, slots), (table_dims, [{0: token_dim}] * len(widths))
