"""Prompt lookup: the tokens that followed the last time the sequence's latest n-gram
appeared in it are the guess for what follows now.

Pays where outputs copy their input: editing or quoting a given text, code changes,
extraction, retrieval-augmented answers. It costs no model and only a few vectorised
comparisons per request: each request's tokens are kept in a numpy buffer that grows with
its outputs (tokens are only ever appended), and a match is found by comparing shifted
views of it, one comparison per n-gram position, never a loop over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tessellm.interfaces.request import Request
from tessellm.interfaces.speculative import Proposer, ProposerContext, SpeculativeConfig

DEFAULT_LOOKUP_MAX = 4
DEFAULT_LOOKUP_MIN = 2


class _TokenBuffer:
    """A request's prompt and output tokens as a growing int64 array."""

    __slots__ = ("data", "size")

    def __init__(self, request: Request) -> None:
        tokens = request.prompt_token_ids
        self.data = np.empty(max(64, 2 * (len(tokens) + 16)), dtype=np.int64)
        self.data[: len(tokens)] = tokens
        self.size = len(tokens)

    def sync(self, request: Request) -> np.ndarray:
        """The request's tokens now (appending the outputs added since the last call)."""
        total = request.num_tokens
        if total > self.size:
            if total > len(self.data):
                grown = np.empty(2 * total, dtype=np.int64)
                grown[: self.size] = self.data[: self.size]
                self.data = grown
            start = self.size - len(request.prompt_token_ids)
            self.data[self.size : total] = request.output_token_ids[start:]
            self.size = total
        return self.data[:total]


def find_continuation(
    tokens: np.ndarray, lookup_max: int, lookup_min: int, num_tokens: int
) -> np.ndarray:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the
    longest suffix of ``tokens`` of ``lookup_min`` to ``lookup_max`` tokens (empty: none)."""
    length = len(tokens)
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        # Starts i with tokens[i:i + n] == the last n tokens, and at least one token after
        # the match that is not part of the suffix itself (i + n < length).
        candidates = length - n
        match = np.ones(candidates, dtype=bool)
        suffix = tokens[length - n :]
        for j in range(n):
            match &= tokens[j : j + candidates] == suffix[j]
        match[-1] = False  # the suffix itself
        hits = np.flatnonzero(match)
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + num_tokens]
    return tokens[:0]


class NgramProposer(Proposer):
    """``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": ...,
    "prompt_lookup_min": ...}`` (vLLM's fields; defaults 4 and 2)."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        super().__init__(config, context)
        self.lookup_max = config.prompt_lookup_max or max(
            DEFAULT_LOOKUP_MAX, config.prompt_lookup_min or 0
        )
        self.lookup_min = config.prompt_lookup_min or min(DEFAULT_LOOKUP_MIN, self.lookup_max)
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        drafts = []
        for request, limit in zip(requests, max_drafts, strict=True):
            buffer = self._buffers.get(request.request_id)
            if buffer is None:
                buffer = self._buffers[request.request_id] = _TokenBuffer(request)
            tokens = buffer.sync(request)
            found = find_continuation(tokens, self.lookup_max, self.lookup_min, limit)
            drafts.append(found.tolist())
        return drafts

    def finished(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._buffers.pop(request_id, None)

    def describe(self) -> dict[str, str]:
        return {
            "speculative_method": "ngram",
            "prompt_lookup": f"{self.lookup_min}-{self.lookup_max}",
        }
