"""A draft model proposes: a smaller model, or a quantized copy of the target, guesses the
next ``k`` tokens greedily, and the target verifies them in one step.

The draft keeps its own KV cache, indexed by the target's block ids: block ``b`` of the
draft's cache holds the draft's KV for the positions that block ``b`` of the target's
cache holds, so the target's block pool manages both (a request's blocks are freed,
shared by prefix caching and reallocated for the two caches at once). At propose time a
request's blocks only reach as far as the target has allocated, so the draft's
speculative tail (positions from ``len(block_ids) * block_size`` on) goes to scratch
blocks of its own past the target's ids, one set per request of a batch.

Only KV written into a request's own blocks for its known tokens counts as the draft's
computed prefix (``draft_computed``). Each propose runs one catch-up forward over every
request's tokens not yet in the draft's cache (one batched plan, a chunk per request,
like the scheduler's), then ``k - 1`` one-token forwards, all greedy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tessellm.interfaces.request import Request
from tessellm.interfaces.schedule import ScheduledSeq
from tessellm.interfaces.speculative import BatchedProposer, ProposerContext, SpeculativeConfig
from tessellm.sampling_params import SamplingParams
from tessellm_spec_draft.draft_runner import DraftRunner

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)


@dataclass(slots=True)
class _DraftState:
    """How much of a request the draft's cache holds: positions ``[0, computed)``, in the
    blocks ``block_ids`` (the request's first ones, as they were when written); and the
    drafts whose KV was written into those blocks from ``computed`` on, which hold the
    sequence's own KV where the target accepted them."""

    computed: int = 0
    block_ids: tuple[int, ...] = ()
    drafts_in_blocks: tuple[int, ...] = ()


@dataclass(slots=True)
class _Row:
    """One request's share of a propose round."""

    index: int  # in the batch: its slot
    limit: int  # drafts wanted
    num_tokens: int
    table: list[int]  # its blocks, then its scratch blocks
    drafts: list[int]
    state: _DraftState | None = None
    num_blocks: int = 0  # the request's own blocks, at the front of ``table``
    start: int = 0  # the first position the round's catch-up writes


class DraftModelProposer(BatchedProposer):
    """``{"method": "draft_model", "model": ..., "num_speculative_tokens": k,
    "quantization": ...}`` (vLLM's fields): the draft runs on the target's platform and
    dtype, with the given quantization (None: the platform's default for the dtype)."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        super().__init__(config, context)
        self.draft = DraftRunner(config, context)
        self.block_size = self.draft.block_size
        k = config.num_speculative_tokens
        # A request's target blocks cover at least its computed tokens (all but the last
        # known one); from there the draft writes the last token and k - 1 drafts, and a
        # catch-up padded to 1 + k tokens (a compiled step's shape) reaches one further:
        # k + 1 positions, which may straddle one more block boundary.
        self.scratch_per_request = -(-(k + 1) // self.block_size) + 1
        self.num_blocks = 0  # the target's; scratch blocks follow
        self._states: dict[str, _DraftState] = {}
        # Block id -> the prefix-cache hash of the full block of known tokens whose KV the
        # draft wrote there. A request admitted with prefix-cache hits starts from the
        # hit blocks that still hold the draft's KV for the same content.
        self._block_contents: dict[int, bytes] = {}

    # -- the seam ------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        return self.draft.bytes_per_block()

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        if block_size != self.block_size:
            raise ValueError(f"block_size {block_size} != the draft's {self.block_size}")
        self.num_blocks = num_blocks
        scratch = self.max_batch * self.scratch_per_request
        self.draft.initialize_cache(num_blocks + scratch)
        logger.info(
            "draft model %s: KV cache for the target's %d blocks and %d scratch blocks (%.1f MiB)",
            self.config.model,
            num_blocks,
            scratch,
            (num_blocks + scratch) * self.draft.bytes_per_block() / (1 << 20),
        )

    def finished(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._states.pop(request_id, None)

    def describe(self) -> dict[str, str]:
        return {"speculative_method": "draft_model", **self.draft.describe()}

    # -- one round -----------------------------------------------------------------------
    def draft_limit(self, request: Request, wanted: int) -> int:
        """Drafts the request can take this round (0: none)."""
        num_tokens = request.num_tokens
        # Each draft input sits at a position the draft (and the target) can hold.
        limit = min(wanted, self.draft.max_model_len - num_tokens)
        # ... and within its blocks and its scratch blocks (always so while the target's
        # blocks cover its computed tokens, as the scheduler keeps them).
        limit = min(limit, self.reach(request.block_ids) - num_tokens + 1)
        return limit if request.block_ids else 0

    def propose_batch(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        if not self.num_blocks:
            raise RuntimeError("initialize_cache must be called before propose")
        rows = [
            _Row(slot, limit, request.num_tokens, [], [])
            for slot, (request, limit) in enumerate(zip(requests, limits, strict=True))
        ]
        self._draft_batch(requests, rows)
        return [row.drafts for row in rows]

    def reach(self, blocks: list[int]) -> int:
        """Positions a request's table can hold: its blocks and its scratch blocks."""
        return (len(blocks) + self.scratch_per_request) * self.block_size

    def _state(self, request: Request) -> _DraftState:
        """The request's draft state, reset when its blocks are no longer the ones the
        draft wrote (it was preempted and readmitted into other blocks); a new one starts
        after the leading blocks whose draft KV is that of the request's tokens."""
        state = self._states.get(request.request_id)
        blocks = request.block_ids
        if state is None or tuple(blocks[: len(state.block_ids)]) != state.block_ids:
            reused = 0
            contents = self._block_contents
            for block_id, block_hash in zip(blocks, request.block_hashes, strict=False):
                if contents.get(block_id) != block_hash:
                    break
                reused += 1
            state = _DraftState(computed=reused * self.block_size)
            self._states[request.request_id] = state
        return state

    def _record_contents(self, request: Request, row: _Row, first: int) -> None:
        """After a round that wrote the request's positions from ``first`` on: its blocks
        written to no longer hold what they held, and those now full of its known tokens
        hold the draft's KV for their content."""
        assert row.state is not None
        bs = self.block_size
        blocks = request.block_ids
        contents = self._block_contents
        written_end = row.num_tokens + self.config.num_speculative_tokens
        for block_id in blocks[first // bs : -(-written_end // bs)]:
            contents.pop(block_id, None)
        hashes = request.block_hashes
        for index in range(first // bs, min(row.state.computed // bs, len(hashes))):
            contents[blocks[index]] = hashes[index]

    def _draft_batch(self, requests: Sequence[Request], rows: list[_Row]) -> None:
        bs = self.block_size
        seqs: list[ScheduledSeq] = []
        for slot, row in enumerate(rows):
            request = requests[row.index]
            state = self._state(request)
            blocks = request.block_ids
            # Through position num_tokens + k - 1: the last draft input's (num_tokens +
            # limit - 2) and the end of a catch-up padded to 1 + k tokens.
            reach = min(row.num_tokens + self.config.num_speculative_tokens, self.reach(blocks))
            needed = -(-reach // bs) - len(blocks)
            scratch = self.num_blocks + slot * self.scratch_per_request
            row.table = [*blocks, *range(scratch, scratch + max(needed, 0))]
            start = state.computed
            for token in state.drafts_in_blocks:  # accepted: the KV written for it stands
                if start >= row.num_tokens or request.token_at(start) != token:
                    break
                start += 1
            # At least the last known token: its logits give the first draft.
            start = row.start = min(start, row.num_tokens - 1)
            seqs.append(
                ScheduledSeq(
                    request.request_id,
                    request.token_slice(start, row.num_tokens),
                    start,
                    row.table,
                    True,
                    GREEDY,
                )
            )
            # KV in the request's own blocks for its known tokens is reusable next round;
            # the tail in scratch blocks, and every draft's KV, is not.
            computed = min(row.num_tokens, len(blocks) * bs)
            state.computed = computed
            row.state, row.num_blocks = state, len(blocks)
        tokens = self.draft.greedy(seqs)
        for row, token in zip(rows, tokens, strict=True):
            row.drafts.append(token)
        for step in range(1, max(row.limit for row in rows)):
            active = [row for row in rows if row.limit > step]
            seqs = [
                ScheduledSeq(
                    requests[row.index].request_id,
                    [row.drafts[-1]],
                    row.num_tokens + step - 1,
                    row.table,
                    True,
                    GREEDY,
                )
                for row in active
            ]
            for row, token in zip(active, self.draft.greedy(seqs), strict=True):
                row.drafts.append(token)
        for row in rows:
            # Draft inputs 1 .. limit - 1 were written at positions num_tokens onwards:
            # those inside the request's own blocks may be reused next round.
            state = row.state
            assert state is not None
            real_end = row.num_blocks * bs
            in_blocks = 0 if state.computed < row.num_tokens else real_end - row.num_tokens
            in_blocks = max(0, min(row.limit - 1, in_blocks))
            state.drafts_in_blocks = tuple(row.drafts[:in_blocks])
            state.block_ids = tuple(row.table[: -(-(state.computed + in_blocks) // bs)])
            self._record_contents(requests[row.index], row, row.start)
