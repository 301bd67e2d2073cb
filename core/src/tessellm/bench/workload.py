"""Synthetic workloads: random prompt tokens with fixed or ranged input/output lengths.

Random token ids (special tokens excluded) make prompts of an exact length without any
dataset, and never share a prefix, so prefix caching cannot flatter a result.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from tessellm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class LengthRange:
    """A length, fixed (``low == high``) or drawn uniformly from ``[low, high]``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> LengthRange:
        """``"128"`` or ``"100:1024"``."""
        raw = str(text).strip()
        try:
            if ":" in raw:
                lo, hi = (int(part) for part in raw.split(":", 1))
            else:
                lo = hi = int(raw)
        except ValueError:
            raise ConfigError(f"length {raw!r} is neither N nor MIN:MAX") from None
        if lo < 1 or hi < lo:
            raise ConfigError(f"length {raw!r}: need 1 <= MIN <= MAX")
        return cls(lo, hi)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    # The ids decoded, for servers that take text prompts only (``bench serve
    # --text-prompts``); the server's own tokenization may differ by a few tokens.
    prompt_text: str | None = None

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def usable_token_ids(vocab_size: int, special_ids: Iterable[int]) -> list[int]:
    """Token ids a random prompt may use: the vocabulary minus special tokens."""
    special = set(special_ids)
    ids = [t for t in range(vocab_size) if t not in special]
    if not ids:
        raise ConfigError("the vocabulary has no ordinary tokens to build prompts from")
    return ids


def make_workload(
    num_prompts: int,
    input_len: LengthRange,
    output_len: LengthRange,
    token_ids: list[int],
    seed: int = 0,
) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n_in = input_len.draw(rng)
        prompt = [token_ids[rng.randrange(len(token_ids))] for _ in range(n_in)]
        requests.append(BenchRequest(prompt, output_len.draw(rng)))
    return requests


def total_output_tokens(requests: Iterable[BenchRequest]) -> int:
    return sum(r.output_len for r in requests)


def total_input_tokens(requests: Iterable[BenchRequest]) -> int:
    return sum(r.input_len for r in requests)
