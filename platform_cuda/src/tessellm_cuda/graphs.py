"""CUDA graphs for decode steps: capture the model's forward once per batch size, replay.

A decode step of a large model launches a few hundred small kernels; launched one by one
from Python, their launch cost rivals the GPU work at small batches. Here the forward
pass is captured for a few batch sizes. A step of ``n`` sequences replays the graph of
the smallest captured size ``B >= n``: its inputs are copied into static buffers, and the
``B - n`` padding rows are made inert: slot ``-1`` (nothing written to the KV cache),
no query token in ``query_start_loc`` and a context length of 0 (the attention kernels
skip them). Larger batches, and steps with prompt tokens, run eagerly.

Only the forward pass is captured: the LM head and the sampler run eagerly on the ``n``
real rows, so no logits are computed for padding and the graphs' memory stays small.

With LoRA kernels (``enable_lora``), each size also gets a graph with the adapters'
shrink and expand in it, which serves every mix of adapters (``tessellm.lora.graph_inputs``).

A model whose windowed layers keep their KV in groups of their own (Gemma 2/3, Qwen with
windows: ``engine/cache_layout.py``) has a block table and slot mapping per group
(``AttentionMetadata.kv_groups``): each group gets static buffers of its own, captured in
the graphs' metadata as the eager step carries them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionBackend, AttentionMetadata
from tessellm.interfaces.platform import GraphSpec
from tessellm.layers.attention import Attention, num_kv_groups
from tessellm.lora.graph_inputs import LoRAGraphInputs

logger = logging.getLogger(__name__)


# Beyond this many sequences a decode step's GPU work dwarfs its launch overhead, and
# every further graph costs capture time and memory: larger batches run eagerly.
MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to ``max_num_seqs`` (at most 512)."""
    largest = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, 8) if s <= largest]
    sizes += list(range(16, largest + 1, 16))
    if sizes[-1] != largest:
        sizes.append(largest)
    return sizes


class CudaGraphRunner:
    """Captures decode forwards per batch size; ``__call__`` replays or returns None."""

    def __init__(
        self,
        model: nn.Module,
        attention: AttentionBackend,
        spec: GraphSpec,
        device: torch.device,
        sizes: list[int] | None = None,
    ) -> None:
        self.model = model
        self.attention = attention
        self.spec = spec
        self.device = device
        if spec.max_draft_tokens:
            logger.info(
                "speculative verification steps (up to %d tokens per sequence) run eagerly: "
                "the CUDA graphs cover one-token decodes only",
                1 + spec.max_draft_tokens,
            )
        self.sizes = sorted(sizes or capture_sizes(spec.max_num_seqs))
        self.max_size = self.sizes[-1]
        width = -(-spec.max_model_len // spec.block_size)
        n = self.max_size
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.int64)
            self.positions = torch.zeros(n, dtype=torch.int64)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.int64)
            self.seq_lens = torch.zeros(n, dtype=torch.int32)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
            self.block_tables = torch.zeros((n, width), dtype=torch.int32)
            # Groups 1..: the windowed layers' tables and slots (group 0 uses the above).
            groups = num_kv_groups([m for m in model.modules() if isinstance(m, Attention)]) - 1
            self.group_slot_mappings = [
                torch.full((n,), -1, dtype=torch.int64) for _ in range(groups)
            ]
            self.group_block_tables = [
                torch.zeros((n, width), dtype=torch.int32) for _ in range(groups)
            ]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.lora = LoRAGraphInputs.of(model, n, device)
        self.lora_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # The model runner hands this runner decode steps with adapters too.
        self.serves_lora = self.lora is not None

    def _metadata(self, size: int) -> AttentionMetadata:
        """Metadata over the static buffers, planned for the longest possible context (each
        KV group's planned on its own, as a step's are)."""
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=self.spec.max_model_len,
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.full((size,), self.spec.max_model_len, dtype=torch.int32),
        )
        groups = tuple(
            dataclasses.replace(
                metadata, block_tables=table[:size], slot_mapping=slots[:size], extra={}
            )
            for table, slots in zip(self.group_block_tables, self.group_slot_mappings, strict=True)
        )
        for group in (metadata, *groups):
            self.attention.prepare(group)
        metadata.kv_groups = groups
        return metadata

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        # While capturing, every row is a one-token sequence of length 1 that writes
        # nothing (slot -1): the warm-up runs compile the kernels without touching the KV
        # cache. Largest first, so the smaller graphs reuse the pool's memory.
        self.seq_lens.fill_(1)
        self.query_start_loc.copy_(torch.arange(self.max_size + 1, dtype=torch.int32))
        for size in sorted(self.sizes, reverse=True):
            metadata = self._metadata(size)
            self.graphs[size] = self._capture_one(size, metadata)
            if self.lora is not None:
                with self.lora.capturing(size):
                    self.lora_graphs[size] = self._capture_one(size, metadata)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured CUDA graphs for batch sizes %s in %.1f s",
            self.sizes,
            time.monotonic() - start,
        )

    def _capture_one(
        self, size: int, metadata: AttentionMetadata
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        ids, pos = self.input_ids[:size], self.positions[:size]
        for _ in range(2):
            self.model(ids, pos, metadata)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(ids, pos, metadata)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, hidden

    def size_for(self, num_seqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor | None:
        n = metadata.num_seqs
        if metadata.max_query_len != 1 or input_ids.shape[0] != n:
            return None
        size = self.size_for(n)
        adapted = self.lora is not None and self.lora.wanted
        graphs = self.lora_graphs if adapted else self.graphs
        if size is None or size not in graphs:
            return None
        tables = [metadata.block_tables, *(g.block_tables for g in metadata.kv_groups)]
        if len(tables) != 1 + len(self.group_block_tables) or any(
            t.shape[1] > self.block_tables.shape[1] for t in tables
        ):
            return None
        graph, hidden = graphs[size]
        if adapted:
            self.lora.copy_in(n, size)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(metadata.seq_lens, non_blocking=True)
        static_tables = [self.block_tables, *self.group_block_tables]
        for static, table in zip(static_tables, tables, strict=True):
            static[:n, : table.shape[1]].copy_(table, non_blocking=True)
        for static, group in zip(self.group_slot_mappings, metadata.kv_groups, strict=True):
            static[:n].copy_(group.slot_mapping, non_blocking=True)
        self.query_start_loc[: n + 1].copy_(metadata.query_start_loc, non_blocking=True)
        if size > n:
            for slots in (self.slot_mapping, *self.group_slot_mappings):
                slots[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()
            self.query_start_loc[n + 1 : size + 1].fill_(n)
        graph.replay()
        return hidden[:n]
