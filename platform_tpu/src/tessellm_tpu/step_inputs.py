"""A step's inputs, padded on the host to its bucket and packed for two transfers.

Everything the compiled program reads is laid out in one int32 and one float32 array
whose layout depends only on the step's :class:`~tessellm_tpu.buckets.StepShape`, so a
step costs two host-to-device copies and the program slices them at fixed offsets.

Padding is inert by construction: padding tokens sit at position 0 of sequence 0 and
write their K/V into the scratch block (the one past the scheduler's blocks); padding
sequences have an all-zero block table, a context of 0 and read their logits from row 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from tessellm.interfaces.schedule import PLACEHOLDER_TOKEN, ScheduledSeq, SchedulerOutput
from tessellm_tpu.buckets import StepShape

# Per-token, per-sequence and fixed int32 fields, in pack order.
TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "token_seq", "feed_src")
SEQ_FIELDS = ("sample_rows", "top_k", "greedy", "seq_lens")
FLOAT_FIELDS = ("temperature", "top_p", "min_p")


def int_layout(shape: StepShape) -> dict[str, tuple[int, int]]:
    """``name -> (offset, length)`` of each int32 field for ``shape``."""
    sizes = [(name, shape.tokens) for name in TOKEN_FIELDS]
    sizes += [(name, shape.seqs) for name in SEQ_FIELDS]
    sizes += [
        ("block_tables", shape.seqs * shape.blocks),
        ("query_start_loc", shape.seqs + 1),
        ("num_seqs", 1),
    ]
    layout, offset = {}, 0
    for name, size in sizes:
        layout[name] = (offset, size)
        offset += size
    return layout


def int_pack_size(shape: StepShape) -> int:
    return sum(size for _, size in int_layout(shape).values())


@dataclass(slots=True)
class HostStep:
    """A padded step on the host: the two packed arrays and what the host keeps."""

    shape: StepShape
    ints: np.ndarray  # int32 [int_pack_size(shape)]
    floats: np.ndarray  # float32 [len(FLOAT_FIELDS) * shape.seqs]
    num_seqs: int
    num_tokens: int

    def field(self, name: str) -> np.ndarray:
        offset, size = int_layout(self.shape)[name]
        return self.ints[offset : offset + size]


def previous_rows(previous_plan: SchedulerOutput | None) -> dict[str, int]:
    """Row of each sequence of the previous step in its sampled-token buffer (the
    buffer has one row per sequence of that step, in plan order)."""
    if previous_plan is None:
        return {}
    return {seq.request_id: i for i, seq in enumerate(previous_plan.seqs)}


def pack_step(
    seqs: list[ScheduledSeq],
    shape: StepShape,
    block_size: int,
    scratch_slot: int,
    feed_rows: dict[str, int],
    sampling: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> HostStep:
    """Pad ``seqs`` to ``shape``. ``feed_rows``: the previous step's row of each request
    (a placeholder token is read from there, on the device). ``sampling``: per-sequence
    (greedy, temperature, top_k, top_p, min_p) or None for all-greedy."""
    n = len(seqs)
    q_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=n)
    starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=n)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    total = int(cu[-1])
    ints = np.zeros(int_pack_size(shape), dtype=np.int32)
    step = HostStep(shape, ints, np.zeros(len(FLOAT_FIELDS) * shape.seqs, np.float32), n, total)

    token_ids = np.fromiter((t for s in seqs for t in s.token_ids), dtype=np.int64, count=total)
    seq_index = np.repeat(np.arange(n), q_lens)
    positions = np.arange(total, dtype=np.int64) - cu[seq_index] + starts[seq_index]
    num_blocks = np.fromiter((len(s.block_ids) for s in seqs), dtype=np.int64, count=n)
    flat_blocks = np.fromiter(
        itertools.chain.from_iterable(s.block_ids for s in seqs),
        dtype=np.int32,
        count=int(num_blocks.sum()),
    )
    full = np.zeros((n, max(1, int(num_blocks.max(initial=0)))), dtype=np.int32)
    full[np.arange(full.shape[1]) < num_blocks[:, None]] = flat_blocks
    # A sequence may hold blocks past its context (allocated ahead): the bucket's width
    # covers the context, and only that much of the table is read.
    width = min(full.shape[1], shape.blocks)
    table = np.zeros((shape.seqs, shape.blocks), dtype=np.int32)
    table[:n, :width] = full[:, :width]
    slots = full[seq_index, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size

    placeholders = token_ids == PLACEHOLDER_TOKEN
    feed_src = np.full(total, -1, dtype=np.int64)
    if placeholders.any():
        rows = np.array([feed_rows[seqs[i].request_id] for i in seq_index[placeholders]])
        feed_src[placeholders] = rows
        token_ids[placeholders] = 0

    step.field("input_ids")[:total] = token_ids
    step.field("positions")[:total] = positions
    slot_field = step.field("slot_mapping")
    slot_field[:] = scratch_slot
    slot_field[:total] = slots
    step.field("token_seq")[:total] = seq_index
    feed = step.field("feed_src")
    feed[:] = -1
    feed[:total] = feed_src
    step.field("sample_rows")[:n] = cu[1:] - 1
    step.field("seq_lens")[:n] = starts + q_lens
    step.field("block_tables")[:] = table.reshape(-1)
    qsl = step.field("query_start_loc")
    qsl[: n + 1] = cu
    qsl[n + 1 :] = total
    step.field("num_seqs")[0] = n

    greedy = step.field("greedy")
    greedy[:] = 1
    temperature, top_p, min_p = step.floats.reshape(len(FLOAT_FIELDS), shape.seqs)
    temperature[:], top_p[:], min_p[:] = 1.0, 1.0, 0.0
    if sampling is not None:
        is_greedy, temp, top_k, p, mp = sampling
        greedy[:n] = is_greedy
        temperature[:n] = np.where(is_greedy, 1.0, temp)
        step.field("top_k")[:n] = top_k
        top_p[:n], min_p[:n] = p, mp
    return step
