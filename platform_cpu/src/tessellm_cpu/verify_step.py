"""Speculative verification steps on a compiled library of ``Q = 1 + k`` tokens a sequence.

A verification step gives each speculating sequence its last token and ``d <= k`` drafts:
``1 + d`` query tokens, ``d`` varying by sequence and by step. A library is traced for
one query count (:class:`~tessellm_cpu.decode_step.DecodeStep` with ``query_len = Q``),
so the runner pads every sequence to ``Q`` tokens: the padding repeats the sequence's
last token at the positions that follow, writes its K/V into the slots after the
sequence's real tokens and is dropped from the output. Those slots lie in the sequence's
own blocks (the scheduler reserves ``1 + k`` positions for a speculating sequence,
``SchedulerConfig.num_lookahead_slots``) and past its real tokens, which attend only to
earlier positions; later steps overwrite them before anything reads them. Where a
sequence's blocks do not reach ``start + Q`` (a sequence without drafts beside
speculating ones has no reserve; the end of ``max_model_len``), the step runs eagerly.

A step of up to ``Q`` tokens per sequence is computed the same way whether its tokens are
drafts or the last few tokens of a prompt (a short chunk after a prefix-cache hit): each
query attends causally to its sequence's positions up to its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.platform import GraphSpec
from tessellm.layers.rotary_longrope import LongRopeRotaryEmbedding as LongRope

logger = logging.getLogger("tessellm_cpu.compiled_decode")  # one logger for the runner

# "0": verification steps run eagerly even with speculation on (a benchmark's baseline);
# their libraries are not built.
VERIFY_ENV = "TESSELLM_CPU_COMPILE_VERIFY"
# Rows of a matmul up to which the int4 linears take their packed kernels (the decode
# libraries split their batch ranges there too, tessellm_quant_int4.cpu_int4): a trace
# follows one branch, so a verification library's batch range must not straddle the
# batch size where sequences × Q passes it.
PACKED_ROWS_SPLIT = 16


def verify_enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "1").strip() != "0"


def verify_batch_ranges(
    decode_ranges: list[tuple[int, int]], query_len: int
) -> list[tuple[int, int]]:
    """The decode libraries' batch ranges, each split where ``sequences × query_len``
    passes :data:`PACKED_ROWS_SPLIT` rows."""
    split = PACKED_ROWS_SPLIT // query_len
    ranges = []
    for low, high in decode_ranges:
        if low <= split < high:
            ranges += [(low, split), (split + 1, high)]
        else:
            ranges.append((low, high))
    return ranges


@dataclass(slots=True)
class PaddedStep:
    """A verification step's inputs with every sequence padded to ``Q`` tokens."""

    input_ids: torch.Tensor  # [B·Q]
    positions: torch.Tensor  # [B·Q]
    slot_mapping: torch.Tensor  # [B·Q]
    seq_lens: torch.Tensor  # [B], start + Q
    real_rows: torch.Tensor | None  # rows of the real tokens in the output; None: all
    group_slots: list[torch.Tensor]  # [B·Q] each: KV groups 1..'s slots (decode_groups)


class NotCovered(Exception):
    """Why a step with several tokens per sequence does not run on the library."""

    def __init__(self, reason: str, verification: bool = True) -> None:
        super().__init__(reason)
        # False: not a verification step's shape at all (a prompt chunk longer than Q).
        self.verification = verification


def pad_step(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    metadata: AttentionMetadata,
    query_len: int,
    block_size: int,
    max_model_len: int,
    length_limits: tuple[int, ...] = (),
    group_tables: tuple[torch.Tensor, ...] = (),
) -> PaddedStep:
    """The step's inputs padded to ``query_len`` tokens per sequence (host arrays, a few
    microseconds each); raises :class:`NotCovered` when it cannot be.

    ``length_limits``: sequence lengths the model's forward branches at (LongRoPE's
    original context: its frequencies follow ``seq_lens``); a sequence the padding would
    take past one is not padded. ``group_tables``: the block tables of KV groups 1..,
    whose slots for the padded positions come back in ``group_slots``."""
    starts_loc = metadata.query_start_loc_cpu.numpy()
    counts = np.diff(starts_loc)
    if int(counts.max()) > query_len:
        raise NotCovered(f"a sequence has more than {query_len} tokens", verification=False)
    if int(counts.min()) < 1:
        raise NotCovered("a sequence without query tokens")
    seq_lens = metadata.seq_lens_cpu.numpy().astype(np.int64)
    starts = seq_lens - counts
    if int(starts.max()) + query_len > max_model_len:
        raise NotCovered(f"a sequence within {query_len} tokens of max_model_len")
    for limit in length_limits:
        if np.any((seq_lens <= limit) & (starts + query_len > limit)):
            raise NotCovered(f"padding would take a sequence past {limit} tokens (LongRoPE)")
    offsets = np.arange(query_len)
    real = offsets < counts[:, None]  # [B, Q]
    # Each padded token repeats its sequence's last real one.
    source = starts_loc[:-1, None] + np.minimum(offsets, counts[:, None] - 1)
    padded_positions = starts[:, None] + offsets
    if not np.array_equal(positions.numpy()[source][real], padded_positions[real]):
        raise NotCovered("positions that do not follow seq_lens")
    columns = padded_positions // block_size
    # Past the block of the last real token, a column is the sequence's only if the table
    # has it: rows are padded with 0, so a 0 there (block 0 or padding) is not trusted.
    beyond = columns > ((seq_lens - 1) // block_size)[:, None]

    def slots_in(table: np.ndarray) -> torch.Tensor:
        width = table.shape[1]
        blocks = np.take_along_axis(table, np.minimum(columns, width - 1), axis=1)
        if np.any(beyond & ((columns >= width) | (blocks == 0))):
            raise NotCovered(
                f"a sequence's KV blocks do not reach {query_len} positions past its start "
                "(no lookahead slots reserved for it)"
            )
        slots = blocks.astype(np.int64) * block_size + padded_positions % block_size
        return torch.from_numpy(slots.ravel())

    slot_mapping = slots_in(metadata.block_tables.numpy())
    group_slots = [slots_in(table.numpy()) for table in group_tables]
    real_rows = None
    if not real.all():
        real_rows = torch.from_numpy(np.flatnonzero(real.ravel()))
    return PaddedStep(
        input_ids=torch.from_numpy(input_ids.numpy()[source].ravel()),
        positions=torch.from_numpy(padded_positions.ravel()),
        slot_mapping=slot_mapping,
        seq_lens=torch.from_numpy((starts + query_len).astype(np.int32)),
        real_rows=real_rows,
        group_slots=group_slots,
    )


class VerificationSteps:
    """A runner's verification libraries (``Q = 1 + k`` tokens per sequence, for the
    decode libraries' batch ranges split by :func:`verify_batch_ranges`) and the steps
    run on them."""

    def __init__(
        self, model: nn.Module, spec: GraphSpec, decode_ranges: list[tuple[int, int]]
    ) -> None:
        self.speculating = spec.max_draft_tokens > 0
        self.query_len = 1 + spec.max_draft_tokens if self.speculating and verify_enabled() else 0
        self.ranges: list[tuple[int, int]] = []
        if self.query_len:
            split = verify_batch_ranges(decode_ranges, self.query_len)
            self.ranges = [r for r in split if r[0] <= spec.max_num_seqs]
        self.block_size = spec.block_size
        self.max_model_len = spec.max_model_len
        self.length_limits = tuple(
            sorted({m.original_max for m in model.modules() if isinstance(m, LongRope)})
        )
        self.libraries: list[tuple[int, int, Any]] = []  # (fewest, most sequences, library)
        self.steps = 0  # run compiled
        self._logged: set[str] = set()

    def add(self, fewest: int, most: int, library: Any) -> None:
        # Replaced whole, never edited in place: a step may be reading the list.
        self.libraries = sorted([*self.libraries, (fewest, most, library)], key=lambda e: e[0])

    def log_eager(self, reason: str) -> None:
        """Say, once per reason, why verification steps run eagerly."""
        if self.speculating and reason not in self._logged:
            self._logged.add(reason)
            logger.info("verification steps run eagerly: %s", reason)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        static: list[torch.Tensor],
        num_groups: int = 1,
    ) -> torch.Tensor | None:
        """The hidden states of the step's tokens from its verification library, padded
        to Q tokens per sequence; None where the step has no library or cannot be padded
        (it then runs eagerly). ``num_groups``: the model's KV groups, whose tables and
        padded slot mappings the library takes after ``static``."""
        if not self.query_len:
            return None  # logged at capture (switched off, or no compiled steps at all)
        if len(metadata.kv_groups) != num_groups - 1:
            return None  # not the model's groups: eager
        n = metadata.num_seqs
        library = next((lib for lo, hi, lib in self.libraries if lo <= n <= hi), None)
        if library is None:
            if not any(lo <= n <= hi for lo, hi in self.ranges):
                covered = " and ".join(f"{lo}-{hi}" for lo, hi in self.ranges)
                self.log_eager(f"{n} sequences (the verification libraries cover {covered})")
            return None  # otherwise its library is building (or failed, logged then)
        try:
            padded = pad_step(
                input_ids,
                positions,
                metadata,
                self.query_len,
                self.block_size,
                self.max_model_len,
                self.length_limits,
                tuple(g.block_tables for g in metadata.kv_groups),
            )
        except NotCovered as reason:
            if reason.verification:
                self.log_eager(str(reason))
            return None
        inputs = [
            padded.input_ids,
            padded.positions,
            padded.slot_mapping,
            metadata.block_tables,
            padded.seq_lens,
            *static,
            *(g.block_tables for g in metadata.kv_groups),
            *padded.group_slots,
        ]
        self.steps += 1
        hidden = library.boxed_run(inputs)[0]
        return hidden if padded.real_rows is None else hidden.index_select(0, padded.real_rows)
