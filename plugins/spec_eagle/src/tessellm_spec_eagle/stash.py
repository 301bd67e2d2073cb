"""The target's hidden states, kept per request from the steps that computed them until the
EAGLE proposer reads them (the model runner's ``hidden_states_sink``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from tessellm.interfaces.request import Request
from tessellm.interfaces.schedule import SchedulerOutput


@dataclass(slots=True)
class HiddenChunk:
    """The rows one step computed for one request: position ``start + j`` with input token
    ``token_ids[j]`` has hidden state ``rows[j]``."""

    start: int
    token_ids: list[int]
    rows: torch.Tensor


class HiddenStash:
    """Rows of every seq of every step, per request, oldest request first.

    A step scheduled while speculation is paused (``disable_by_batch_size``), or for a
    request that never speculates (a grammar), would keep rows nobody reads: past
    ``max_rows`` rows the requests updated longest ago lose theirs, and the proposer fills
    the positions it lacks with zeros (worse guesses, same outputs)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.num_rows = 0
        self.num_dropped = 0  # requests whose rows were dropped past the cap
        self._chunks: OrderedDict[str, list[HiddenChunk]] = OrderedDict()

    def __call__(self, plan: SchedulerOutput, hidden: torch.Tensor) -> None:
        # A graph runner's output buffer is overwritten by the next step: one copy.
        hidden = hidden.detach().clone()
        offset = 0
        for seq in plan.seqs:
            count = len(seq.token_ids)
            chunk = HiddenChunk(seq.start_pos, seq.token_ids, hidden[offset : offset + count])
            self._chunks.setdefault(seq.request_id, []).append(chunk)
            self._chunks.move_to_end(seq.request_id)
            offset += count
            self.num_rows += count
        while self.num_rows > self.max_rows and len(self._chunks) > 1:
            _, dropped = self._chunks.popitem(last=False)
            self.num_rows -= sum(len(c.token_ids) for c in dropped)
            self.num_dropped += 1

    def take(self, request_id: str) -> list[HiddenChunk]:
        """The request's chunks, oldest first; the stash forgets them."""
        chunks = self._chunks.pop(request_id, [])
        self.num_rows -= sum(len(c.token_ids) for c in chunks)
        return chunks

    def forget(self, request_id: str) -> None:
        self.take(request_id)


def fill_rows(
    out: torch.Tensor,
    filled: np.ndarray,
    first: int,
    chunks: list[HiddenChunk],
    request: Request,
) -> None:
    """Write into ``out`` (row ``i``: position ``first + i``) the chunks' rows that are the
    target's states for the request's known tokens, and mark them in ``filled``. A row is
    such a state when its chunk's inputs up to it are the known tokens: past a rejected
    draft, they are not. Later chunks win."""
    end = first + out.shape[0]
    for chunk in chunks:
        width = min(len(chunk.token_ids), request.num_tokens - chunk.start)
        if width <= 0:
            continue
        given = np.asarray(chunk.token_ids[:width])
        actual = np.asarray(request.token_slice(chunk.start, chunk.start + width))
        mismatch = np.flatnonzero(given != actual)
        valid = int(mismatch[0]) if mismatch.size else width
        lo, hi = max(chunk.start, first), min(chunk.start + valid, end)
        if lo >= hi:
            continue
        out[lo - first : hi - first] = chunk.rows[lo - chunk.start : hi - chunk.start]
        filled[lo - first : hi - first] = True
