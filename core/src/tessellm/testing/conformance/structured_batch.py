"""The structured-output conformance check of ``GrammarMatcher.fill_bitmasks``: a step's
rows filled in one call equal each matcher's own ``fill_bitmask``."""

from __future__ import annotations

from typing import Any

import torch

from tessellm.interfaces.structured_output import CompiledGrammar, GrammarMatcher
from tessellm.testing.conformance.result import Checker

# Rows in one batched fill: past the thresholds at which backends hand rows to threads.
BATCH_ROWS = 12


def check_batched_fill(
    checker: Checker, compiled: CompiledGrammar, tokens: list[int], eos: int, words: int, label: str
) -> None:
    """Matchers at every prefix of ``tokens`` (a valid output; the last one terminated by
    ``eos``), filled together, give the rows each fills alone, and only those rows."""
    matchers: list[GrammarMatcher] = []
    for i in range(BATCH_ROWS):
        last = i == BATCH_ROWS - 1
        prefix = [*tokens, eos] if last else tokens[: i % (len(tokens) + 1)]
        matcher = compiled.new_matcher()
        if not all(matcher.accept_token(t) for t in prefix):
            checker.fail(f"[{label}] batched fill: a valid output or its prefix was refused")
            return
        matchers.append(matcher)
    alone = torch.zeros(BATCH_ROWS, words, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(alone, row)
    together = torch.full((BATCH_ROWS + 1, words), -7, dtype=torch.int32)
    cls: Any = type(matchers[0])
    cls.fill_bitmasks(matchers, together[:BATCH_ROWS])
    differ = [r for r in range(BATCH_ROWS) if not torch.equal(alone[r], together[r])]
    checker.expect(
        not differ, f"[{label}] fill_bitmasks differs from fill_bitmask in rows {differ}"
    )
    checker.expect(
        bool((together[BATCH_ROWS] == -7).all()),
        f"[{label}] fill_bitmasks wrote past its {BATCH_ROWS} rows",
    )
