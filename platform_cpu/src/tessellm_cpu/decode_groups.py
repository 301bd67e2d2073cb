"""KV groups in a compiled step: one block table and slot mapping per group.

A model whose windowed layers keep their KV in tables of their own (Gemma 2/3, Qwen with
windows: ``engine/cache_layout.py``, KV groups over one page pool) has ``group_size`` K/V
tensor pairs, the ``k``-th shared by the ``k``-th layer of every group, and each step one
block table and slot mapping per group (``AttentionMetadata.kv_groups``). A library takes
group 0's table and slot mapping where a one-table library has them, and the tables and
slot mappings of groups 1.. after the weights, each table with a width of its own; inside
the step each layer reads its group's metadata as the eager path does
(``Attention.kv_group``).

Caches stay one input pair per layer, so layers of different groups get the same tensor
as different inputs. Each input is then written by one layer, into its group's pages,
and read through that group's table only: inductor writes such an input in place, as in
a one-table library. Given each shared tensor once instead, the writes of every group's
layer form a chain of functional updates of one input, which inductor does not put back
in place: the step then copied every cache tensor whole, twice (Gemma 3 270M with a 1 GiB
pool: 6.2 tok/s at batch 1 against 10.8 for one table). Aliased inputs are only correct
if written in place, so a library for several groups is checked once, on scratch caches,
before it is used (:func:`write_check`); one that fails leaves such steps eager.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils import _pytree as pytree

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.layers.attention import Attention, num_kv_groups


def layout_facts(attn_layers: list[Attention]) -> list[int] | None:
    """Each layer's group, for the library key (None for one group: its libraries' keys
    stay what they were)."""
    if num_kv_groups(attn_layers) == 1:
        return None
    return [layer.kv_group for layer in attn_layers]


def distinct_example_caches(kv_caches: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """Stand-ins of ``blocks`` blocks for caches some of which are one tensor (the export
    cannot take aliased inputs that are written); ``kv_caches`` as they are otherwise."""
    if len({id(c) for c in kv_caches}) == len(kv_caches):
        return kv_caches
    return [torch.empty((blocks, *c.shape[1:]), dtype=c.dtype, device=c.device) for c in kv_caches]


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


def write_check(
    library: object,
    attn_layers: list[Attention],
    weights: dict[str, torch.Tensor],
    query_len: int,
    token_id: int,
) -> str | None:
    """Run ``library`` once on scratch caches shared as the real ones are (one sequence of
    ``query_len`` tokens, each group in pages of its own) and check that every layer's
    keys and values reached its group's pages: a library that wrote a shared cache through a copy
    would have put back stale pages of the other groups. None when they all did, else
    what went wrong."""
    groups = num_kv_groups(attn_layers)
    block_size = attn_layers[0].k_cache.shape[1]
    width = -(-query_len // block_size)
    scratch: dict[int, torch.Tensor] = {}
    caches = []
    for layer in attn_layers:
        for real in (layer.k_cache, layer.v_cache):
            if id(real) not in scratch:
                shape = (1 + groups * width, *real.shape[1:])
                scratch[id(real)] = torch.zeros(shape, dtype=real.dtype, device=real.device)
            caches.append(scratch[id(real)])
    device = caches[0].device
    positions = torch.arange(query_len, device=device)
    tables = [
        torch.arange(1 + g * width, 1 + (g + 1) * width, dtype=torch.int32, device=device)[None]
        for g in range(groups)
    ]
    slots = [
        (t[0, positions // block_size] * block_size + positions % block_size).long() for t in tables
    ]
    inputs = [
        torch.full((query_len,), token_id, dtype=torch.int64, device=device),
        positions,
        slots[0],
        tables[0],
        torch.tensor([query_len], dtype=torch.int32, device=device),
        *caches,
        *pytree.tree_leaves(weights),
        *tables[1:],
        *slots[1:],
    ]
    try:
        library.boxed_run(inputs)
    except Exception as exc:  # any failure means: do not use it
        return f"{type(exc).__name__}: {exc}"
    for index, layer in enumerate(attn_layers):
        for which, cache in (("keys", caches[2 * index]), ("values", caches[2 * index + 1])):
            written = cache.flatten(0, 1)[slots[layer.kv_group]]
            if not bool(written.ne(0).any(dim=-1).any(dim=-1).all()):
                return f"layer {index}'s {which} are missing from its group's pages"
    return None
