"""The per-step attention plan: built once in ``prepare`` and shared by every layer.

A step's sequences split in two groups. Decode sequences (one query token each) attend in
one batched call over their blocks. Prefill and chunked-prefill sequences (several query
tokens) are padded to the longest query of their group and attend in one batched call
with a causal mask. Every index, mask and count either group needs is computed here, on
the host, once per step; a layer's forward only gathers, attends and scatters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tessellm.interfaces.attention import AttentionMetadata


@dataclass(slots=True)
class GroupPlan:
    """One batched attention call over ``num_seqs`` sequences padded to a common shape."""

    num_seqs: int
    query_len: int  # padded query length (1 for decode)
    num_blocks: int  # blocks per sequence in the gathered context
    block_ids: torch.Tensor  # int64 [num_seqs * num_blocks], row-major
    # Packed query rows of the group, [num_seqs * query_len]; None when the group is the
    # whole batch in packed order (decode-only steps), so no gather is needed.
    query_rows: torch.Tensor | None
    # For prefill groups: which padded rows are real, and where they go in the output.
    valid_rows: torch.Tensor | None
    output_rows: torch.Tensor | None
    q_positions: torch.Tensor  # int64 [num_seqs, query_len]
    # When one sequence's blocks are consecutive in the cache, its context is a view.
    first_block: int | None = None
    context_len: int = 0  # the single sequence's length when ``first_block`` is set
    masks: dict[tuple[int | None, bool], torch.Tensor | None] = field(default_factory=dict)

    def mask(
        self, block_size: int, sliding_window: int | None, additive: bool = False
    ) -> torch.Tensor | None:
        """``[num_seqs, 1, query_len, keys]``: boolean (True = attend) or, ``additive``, an
        fp32 bias of 0 and -inf. None when nothing is hidden. Cached per window and kind."""
        key = (sliding_window, additive)
        if key in self.masks:
            return self.masks[key]
        mask = None
        view = self.first_block is not None
        if not (view and self.query_len == 1 and not sliding_window):
            keys = self.context_len if view else self.num_blocks * block_size
            k_pos = torch.arange(keys)[None, None, :]
            q_pos = self.q_positions[:, :, None]
            allowed = k_pos <= q_pos
            if sliding_window:
                allowed &= (q_pos - k_pos) < sliding_window
            mask = allowed[:, None]
            if additive:
                mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        self.masks[key] = mask
        return mask


@dataclass(slots=True)
class StepPlan:
    all_slots_valid: bool
    decode: GroupPlan | None
    prefill: GroupPlan | None


def _contiguous_run(block_ids: np.ndarray) -> int | None:
    """The first block id when ``block_ids`` are consecutive, else None."""
    if block_ids.size == 0:
        return None
    first = int(block_ids[0])
    if block_ids.size == 1 or np.array_equal(block_ids, np.arange(first, first + block_ids.size)):
        return first
    return None


def _group(
    seqs: np.ndarray,
    q_starts: np.ndarray,
    q_lens: np.ndarray,
    seq_lens: np.ndarray,
    tables: np.ndarray,
    block_size: int,
    whole_batch: bool,
) -> GroupPlan:
    n = seqs.size
    g_q_lens, g_seq_lens = q_lens[seqs], seq_lens[seqs]
    qmax = int(g_q_lens.max())
    num_blocks = -(-int(g_seq_lens.max()) // block_size)
    block_ids = tables[seqs, :num_blocks].astype(np.int64)
    j = np.arange(qmax)[None, :]
    # Padded query slots repeat the sequence's last real row: a finite, discarded result.
    q_idx = np.minimum(j, (g_q_lens - 1)[:, None])
    q_positions = (g_seq_lens - g_q_lens)[:, None] + q_idx
    first_block = None
    if n == 1:
        first_block = _contiguous_run(block_ids[0])
    query_rows = valid_rows = output_rows = None
    if qmax > 1:
        rows = q_starts[seqs][:, None] + q_idx
        query_rows = torch.from_numpy(rows.reshape(-1).astype(np.int64))
        valid = (j < g_q_lens[:, None]).reshape(-1)
        valid_rows = torch.from_numpy(np.flatnonzero(valid).astype(np.int64))
        output_rows = torch.from_numpy(rows.reshape(-1)[valid].astype(np.int64))
    elif not whole_batch:
        query_rows = torch.from_numpy(q_starts[seqs].astype(np.int64))
    return GroupPlan(
        num_seqs=n,
        query_len=qmax,
        num_blocks=num_blocks,
        block_ids=torch.from_numpy(np.ascontiguousarray(block_ids).reshape(-1)),
        query_rows=query_rows,
        valid_rows=valid_rows,
        output_rows=output_rows,
        q_positions=torch.from_numpy(q_positions.astype(np.int64)),
        first_block=first_block,
        context_len=int(g_seq_lens[0]) if first_block is not None else 0,
    )


def build_plan(metadata: AttentionMetadata, block_size: int) -> StepPlan:
    starts = metadata.query_start_loc_cpu.numpy().astype(np.int64)
    q_lens = np.diff(starts)
    seq_lens = metadata.seq_lens_cpu.numpy().astype(np.int64)
    tables = metadata.block_tables.cpu().numpy()
    decode_seqs = np.flatnonzero(q_lens == 1)
    prefill_seqs = np.flatnonzero(q_lens > 1)
    whole_batch = decode_seqs.size == q_lens.size
    decode = prefill = None
    if decode_seqs.size:
        decode = _group(decode_seqs, starts, q_lens, seq_lens, tables, block_size, whole_batch)
    if prefill_seqs.size:
        prefill = _group(prefill_seqs, starts, q_lens, seq_lens, tables, block_size, False)
    slots = metadata.slot_mapping
    return StepPlan(bool((slots >= 0).all()), decode, prefill)
