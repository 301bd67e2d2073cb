"""The decode step a library compiles: its module, its inputs, the export, AOTInductor.

:class:`DecodeStep` takes ``B`` sequences of ``Q`` query tokens each (``Q`` static: 1 for
a decode library, ``1 + k`` for a speculative verification library) and a block table
``W`` columns wide, ``B`` and ``W`` dynamic, and the cache's block count too: one library
serves every batch in its range and every context length. Weights and KV caches are
inputs, not constants: the library holds only code, shares the model's tensors, and does
not depend on the weights' values. A model whose layers read several KV groups' block
tables takes each group's table and slot mapping (:mod:`tessellm_cpu.decode_groups`).
Used by the build process
(:mod:`tessellm_cpu.background_build`) and, for loading, by the runner
(:mod:`tessellm_cpu.compiled_decode`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.layers.attention import Attention
from tessellm_cpu import cache_store
from tessellm_cpu.background_build import KV_EXAMPLE_BLOCKS
from tessellm_cpu.decode_groups import (
    distinct_example_caches,
    example_inputs,
    group_metadata,
    num_kv_groups,
)


class DecodeStep(nn.Module):
    """The model's forward for ``B`` sequences of ``query_len`` tokens each (the last
    ``query_len`` of each sequence's ``seq_lens`` positions), with weights and KV caches
    as inputs. Token inputs are flat, sequence by sequence (``B·Q`` rows); KV groups
    1.. (if any) bring their tables and slot mappings last."""

    def __init__(self, model: nn.Module, attn_layers: list[Attention], query_len: int = 1) -> None:
        super().__init__()
        self.model = model
        self._attn_layers = attn_layers
        self.query_len = query_len

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],
        weights: dict[str, torch.Tensor],
        group_tables: list[torch.Tensor] | None = None,
        group_slots: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for i, layer in enumerate(self._attn_layers):
            layer.bind_kv_cache(kv_caches[2 * i], kv_caches[2 * i + 1])
        # query_len tokens per sequence. The host-side fields are not read under tracing
        # (a traced backend uses tensors only); they get the device tensors.
        query_start_loc = (
            torch.arange(block_tables.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
            * self.query_len
        )
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            max_query_len=self.query_len,
            max_seq_len=0,
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        if group_tables:
            metadata.kv_groups = group_metadata(metadata, group_tables, group_slots or [])
        return torch.func.functional_call(self.model, weights, (input_ids, positions, metadata))


def decode_inputs(model: nn.Module) -> tuple[list[Attention], list[torch.Tensor], dict]:
    """The attention layers, their KV caches (K, V per layer: layers of several KV
    groups share tensors, decode_groups.py) and the weights, in the order the library
    takes them."""
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    kv_caches = [t for layer in attn_layers for t in (layer.k_cache, layer.v_cache)]
    weights = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    return attn_layers, kv_caches, weights


# Example sizes of the dimensions left dynamic (table width, cache blocks; the child's
# stand-in caches have background_build.KV_EXAMPLE_BLOCKS = 7): a batch size must differ
# from them, or the exporter could unify the dimensions.
_TAKEN_EXAMPLE_SIZES = (3, 7)


def example_batch(batch_range: tuple[int, int], query_len: int) -> int:
    """The batch size to trace ``batch_range`` with: in the range, at least 2 (sizes 0 and
    1 specialise) where the range allows, unlike the other dynamic dimensions' examples."""
    low, high = batch_range
    for batch in range(max(low, 2), high + 1):
        if batch not in _TAKEN_EXAMPLE_SIZES and batch * query_len not in _TAKEN_EXAMPLE_SIZES:
            return batch
    return low


def export_decode_step(
    model: nn.Module, batch_range: tuple[int, int], query_len: int = 1
) -> torch.export.ExportedProgram:
    """``model``'s step for ``batch_range`` sequences of ``query_len`` tokens each
    (dynamic batch, block-table width and cache block count; a range of one size has it
    static). Leaves the model as it found it."""
    attn_layers, kv_caches, weights = decode_inputs(model)
    kv_caches = distinct_example_caches(kv_caches, KV_EXAMPLE_BLOCKS)
    batch, width = example_batch(batch_range, query_len), 3
    tokens = batch * query_len
    args: tuple = (
        torch.zeros(tokens, dtype=torch.int64),
        torch.arange(tokens, dtype=torch.int64),
        torch.arange(tokens, dtype=torch.int64),
        torch.zeros(batch, width, dtype=torch.int32),
        torch.full((batch,), query_len, dtype=torch.int32),
        kv_caches,
        weights,
    )
    seqs = None
    if batch_range[0] < batch_range[1]:
        seqs = torch.export.Dim("num_seqs", min=batch_range[0], max=batch_range[1])
    rows = seqs if seqs is None or query_len == 1 else query_len * seqs
    table_width = torch.export.Dim("table_width", min=1, max=1 << 20)
    blocks = torch.export.Dim("num_blocks", min=2, max=1 << 30)
    dynamic = (
        {0: rows},
        {0: rows},
        {0: rows},
        {0: seqs, 1: table_width},
        {0: seqs},
        [{0: blocks}] * len(kv_caches),
        dict.fromkeys(weights),
    )
    num_groups = num_kv_groups(attn_layers)
    if num_groups > 1:  # each further KV group's block table and slot mapping
        taken = {0, 1, width, batch, tokens, *_TAKEN_EXAMPLE_SIZES}
        taken |= {int(c.shape[0]) for c in kv_caches}
        group_args, group_dims = example_inputs(num_groups, batch, tokens, seqs, rows, taken)
        args, dynamic = (*args, *group_args), (*dynamic, *group_dims)
    # Trace the plain torch code: a fused-op table may branch on tensor values.
    fused = [(m, m.fused_ops) for m in model.modules() if hasattr(m, "fused_ops")]
    caches = [(layer, layer.k_cache, layer.v_cache) for layer in attn_layers]
    try:
        for module, _ in fused:
            module.fused_ops = None
        with warnings.catch_warnings():
            # The KV cache attributes are rebound during the trace on purpose.
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            return torch.export.export(
                DecodeStep(model, attn_layers, query_len),
                args,
                dynamic_shapes=dynamic,
                strict=False,
            )
    finally:
        for module, ops in fused:
            module.fused_ops = ops
        for layer, k, v in caches:
            layer.bind_kv_cache(k, v)


def compile_library(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor: ``program`` into the library ``path`` (written whole or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}{cache_store.PARTIAL_SUFFIX}")
    # The trace assumes dynamic sizes of at least 2 (sizes 0 and 1 would specialise),
    # yet one sequence or one block runs the same code: the library's optional input
    # checks (AOTI_RUNTIME_CHECK_INPUTS=1) must not reject them.
    options = {}
    if hasattr(torch._inductor.config.aot_inductor, "check_lowerbound"):
        options["aot_inductor.check_lowerbound"] = False
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(partial), inductor_configs=options
    )
    os.replace(partial, path)


def load_library(path: Path) -> Any:
    """The library's C++ loader: milliseconds (``aoti_load_package`` would first import
    inductor's Python, about a second)."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)
    except TypeError:  # another constructor signature: go through inductor
        loader = torch._inductor.aoti_load_package(str(path), run_single_threaded=True).loader
    cache_store.touch(path)
    return loader
