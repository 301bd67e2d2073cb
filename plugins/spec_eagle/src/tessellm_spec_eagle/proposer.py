"""An EAGLE head proposes: a one-layer network over the target's hidden states guesses the
next ``k`` tokens greedily, and the target verifies them in one step.

Row ``p`` of the head pairs the target's state at position ``p`` with token ``p + 1``
(``head.py``), so a request of ``n`` known tokens, whose target states reach position
``n - 2`` (the last token is not computed yet), gets its first guess from the row at
``n - 2``. Each further guess feeds the previous one back, with the head's own output in
place of the target's state it does not have, one position on.

The target's states come from the model runner's ``hidden_states_sink`` (the stash): a
round's catch-up writes the head's KV for the positions since its last round, from the
rows of the accepted tokens (a row past a rejected draft is told by its input token).
Only KV written from the target's states counts as the head's computed prefix; what the
guesses wrote (from its own outputs) is overwritten next round.

Like the draft-model proposer, the head's cache is indexed by the target's block ids, with
scratch blocks past them for a round's tail; the head's KV in a full block is reused by a
request that hits that block in the prefix cache when the block's content hash and the
token after it match what the head wrote it for (the last row of a block reads the next
block's first token).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tessellm.interfaces.request import Request
from tessellm.interfaces.schedule import ScheduledSeq
from tessellm.interfaces.speculative import BatchedProposer, ProposerContext, SpeculativeConfig
from tessellm.sampling_params import SamplingParams
from tessellm_spec_eagle.head import EagleRunner
from tessellm_spec_eagle.stash import HiddenStash, fill_rows

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)
# The stash keeps at least this many rows (and two of the largest steps).
MIN_STASH_ROWS = 16384


@dataclass(slots=True)
class _HeadState:
    """Positions ``[0, computed)`` of a request hold the head's KV, written from the
    target's states (``exact``: none was missing and filled with zeros), in ``block_ids``
    (its first blocks, as they were); ``last_hidden``: the target's state at
    ``computed - 1``, for a round that must write that position again."""

    computed: int = 0
    block_ids: tuple[int, ...] = ()
    last_hidden: torch.Tensor | None = None
    exact: bool = True


@dataclass(slots=True)
class _Row:
    """One request's share of a propose round."""

    index: int  # in the batch: its slot
    limit: int  # guesses wanted
    num_tokens: int
    table: list[int] = field(default_factory=list)  # its blocks, then its scratch blocks
    drafts: list[int] = field(default_factory=list)
    start: int = 0  # the first position the round's catch-up writes
    state: _HeadState | None = None


class EagleProposer(BatchedProposer):
    """``{"method": "eagle", "model": <head>, "num_speculative_tokens": k}``: the head runs
    on the target's device and dtype, sharing its embedding and LM head."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        super().__init__(config, context)
        self.head = EagleRunner(config, context)
        self.block_size = bs = self.head.block_size
        k = config.num_speculative_tokens
        # A request's blocks cover its target-computed positions (to n - 2) from a block
        # boundary on; a round writes guesses 1 .. k - 1 at positions n - 1 .. n + k - 3.
        self.scratch_per_request = max(1, -(-(k - 1) // bs))
        args = context.args
        step_rows = max(args.max_num_batched_tokens or 8192, context.max_model_len)
        self.stash = HiddenStash(max(MIN_STASH_ROWS, 2 * step_rows))
        self.num_blocks = 0  # the target's; scratch blocks follow
        self._states: dict[str, _HeadState] = {}
        # Block id -> (prefix-cache hash, the token after the block) the head's KV there is for.
        self._block_contents: dict[int, tuple[bytes, int]] = {}

    # -- the seam ------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        return self.head.bytes_per_block()

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        if block_size != self.block_size:
            raise ValueError(f"block_size {block_size} != the head's {self.block_size}")
        self.num_blocks = num_blocks
        scratch = self.max_batch * self.scratch_per_request
        self.head.initialize_cache(num_blocks + scratch)
        # From now on (not during the target's profiling run): every step's states.
        target = self.context.target
        assert target is not None
        target.hidden_states_sink = self.stash
        logger.info(
            "EAGLE head %s: KV cache for the target's %d blocks and %d scratch blocks (%.1f MiB)",
            self.config.model,
            num_blocks,
            scratch,
            (num_blocks + scratch) * self.head.bytes_per_block() / (1 << 20),
        )

    def finished(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._states.pop(request_id, None)
            self.stash.forget(request_id)

    def describe(self) -> dict[str, str]:
        return {"speculative_method": "eagle", **self.head.describe()}

    # -- one round -----------------------------------------------------------------------
    def draft_limit(self, request: Request, wanted: int) -> int:
        """Guesses the request can take this round (0: none)."""
        n = request.num_tokens
        blocks = request.block_ids
        reach = (len(blocks) + self.scratch_per_request) * self.block_size
        # Guesses sit at positions n .. n + limit - 1; the round writes up to n + limit - 3.
        limit = min(wanted, self.head.max_model_len - n, reach - n + 2)
        # The first guess reads the target's state at n - 2: it must exist, in the blocks.
        if n < 2 or n - 1 > len(blocks) * self.block_size:
            return 0
        return limit

    def propose_batch(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        if not self.num_blocks:
            raise RuntimeError("initialize_cache must be called before propose")
        rows = [
            _Row(slot, limit, request.num_tokens)
            for slot, (request, limit) in enumerate(zip(requests, limits, strict=True))
        ]
        self._draft_batch(requests, rows)
        return [row.drafts for row in rows]

    def _state(self, request: Request, num_tokens: int) -> _HeadState:
        """The request's state, new when its blocks are no longer the ones the head wrote
        (preempted and readmitted elsewhere): it starts after the leading blocks whose head
        KV is for the request's tokens (up to position n - 2, whose state it has)."""
        state = self._states.get(request.request_id)
        blocks = request.block_ids
        if state is None or tuple(blocks[: len(state.block_ids)]) != state.block_ids:
            bs = self.block_size
            reused = 0
            for block_id, block_hash in zip(blocks, request.block_hashes, strict=False):
                after = (reused + 1) * bs
                if after > num_tokens - 2:
                    break
                if self._block_contents.get(block_id) != (block_hash, request.token_at(after)):
                    break
                reused += 1
            state = _HeadState(computed=reused * bs, block_ids=tuple(blocks[:reused]))
            self._states[request.request_id] = state
        return state

    def _catch_up(
        self, request: Request, row: _Row, slot: int
    ) -> tuple[ScheduledSeq, torch.Tensor]:
        """The round's first seq for the request (positions ``start .. n - 2``) and the
        target's states for it; updates its state to the positions it writes."""
        bs, n = self.block_size, row.num_tokens
        state = row.state = self._state(request, n)
        blocks = request.block_ids
        needed = (n + row.limit - 3) // bs + 1 - len(blocks)
        scratch = self.num_blocks + slot * self.scratch_per_request
        row.table = [*blocks, *range(scratch, scratch + max(needed, 0))]
        start = row.start = min(state.computed, n - 2)
        head = self.head
        hidden = torch.zeros(
            (n - 1 - start, head.config.hidden_size), dtype=head.dtype, device=head.device
        )
        filled = np.zeros(n - 1 - start, dtype=bool)
        if start < state.computed and state.last_hidden is not None:
            hidden[0] = state.last_hidden
            filled[0] = True
        fill_rows(hidden, filled, start, self.stash.take(request.request_id), request)
        state.exact = state.exact and bool(filled.all())
        state.computed = n - 1
        state.last_hidden = hidden[-1]
        state.block_ids = tuple(blocks[: -(-(n - 1) // bs)])
        seq = ScheduledSeq(
            request.request_id, request.token_slice(start + 1, n), start, row.table, True, GREEDY
        )
        return seq, hidden

    def _draft_batch(self, requests: Sequence[Request], rows: list[_Row]) -> None:
        parts = [self._catch_up(requests[row.index], row, slot) for slot, row in enumerate(rows)]
        last, tokens = self.head.run([seq for seq, _ in parts], torch.cat([h for _, h in parts]))
        for row, token in zip(rows, tokens, strict=True):
            row.drafts.append(token)
        active = list(range(len(rows)))
        for step in range(1, max(row.limit for row in rows)):
            keep = [j for j, i in enumerate(active) if rows[i].limit > step]
            active, last = [active[j] for j in keep], last[keep]
            seqs = [
                ScheduledSeq(
                    requests[rows[i].index].request_id,
                    [rows[i].drafts[-1]],
                    rows[i].num_tokens - 2 + step,
                    rows[i].table,
                    True,
                    GREEDY,
                )
                for i in active
            ]
            # The head's own output stands in for the target state it has not got.
            last, tokens = self.head.run(seqs, last)
            for i, token in zip(active, tokens, strict=True):
                rows[i].drafts.append(token)
        for row in rows:
            self._record_contents(requests[row.index], row)

    def _record_contents(self, request: Request, row: _Row) -> None:
        """After a round: blocks it wrote no longer hold what they held; the request's full
        blocks of exact head KV hold it for their content and the token after them."""
        state = row.state
        assert state is not None
        bs, n = self.block_size, row.num_tokens
        contents = self._block_contents
        for block_id in row.table[row.start // bs : (n + row.limit - 3) // bs + 1]:
            contents.pop(block_id, None)
        if not state.exact:
            return
        blocks, hashes = request.block_ids, request.block_hashes
        for index in range(row.start // bs, min(state.computed // bs, len(hashes))):
            after = (index + 1) * bs
            if after < n:
                contents[blocks[index]] = (hashes[index], request.token_at(after))
