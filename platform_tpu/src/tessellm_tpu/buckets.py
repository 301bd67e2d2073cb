"""Padding buckets: the few shapes every step on XLA is padded to.

XLA compiles one program per input shape. A step is padded to a bucket of three sizes:

- tokens ``T``: powers of two from ``MIN_TOKENS`` up to the scheduler's token budget
  (the largest bucket is the budget itself when it is no power of two);
- sequences ``S``: ``min(T, S_max)``, where ``S_max`` is ``max_num_seqs`` rounded up to
  a power of two. A step never has more sequences than tokens, so ``S`` follows from
  ``T`` and adds no dimension to the set of programs;
- context ``W`` (block-table width, in KV blocks): powers of two from the width of
  ``MIN_CONTEXT`` tokens up to that of ``max_model_len``. The gather-based attention
  costs ``T x W x block_size``, so short contexts are not padded to the longest.

A serving run therefore compiles at most ``len(token_buckets) * len(context_buckets)``
programs per sampling kind, all of them at start-up.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_TOKENS = 16
MIN_CONTEXT = 128


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """``smallest``, then doubling, up to and including ``largest`` (the last bucket is
    ``largest`` itself when it is no power of two)."""
    smallest = max(1, min(smallest, largest))
    sizes = []
    size = 1
    while size < smallest:
        size *= 2
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return tuple(sizes)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pick(buckets: tuple[int, ...], n: int, what: str) -> int:
    index = bisect.bisect_left(buckets, n)
    if index == len(buckets):
        raise ValueError(f"{n} {what} exceed the largest bucket ({buckets[-1]})")
    return buckets[index]


@dataclass(frozen=True, slots=True)
class StepShape:
    """The padded shape of one step: what its compiled program is keyed by."""

    tokens: int
    seqs: int
    blocks: int  # block-table width


@dataclass(frozen=True, slots=True)
class Buckets:
    token_buckets: tuple[int, ...]
    context_buckets: tuple[int, ...]  # in KV blocks
    max_seqs: int  # S_max: the sequence dimension of the sampled-token buffer

    @classmethod
    def for_engine(
        cls,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        min_tokens: int = MIN_TOKENS,
        min_context: int = MIN_CONTEXT,
    ) -> Buckets:
        max_blocks = -(-max_model_len // block_size)
        min_blocks = -(-min(min_context, max_model_len) // block_size)
        return cls(
            token_buckets=power_of_two_buckets(min_tokens, max_num_batched_tokens),
            context_buckets=power_of_two_buckets(min_blocks, max_blocks),
            max_seqs=next_power_of_two(max_num_seqs),
        )

    def seqs_for(self, tokens: int) -> int:
        return min(tokens, self.max_seqs)

    def shape_for(self, num_tokens: int, num_seqs: int, num_blocks: int) -> StepShape:
        """The smallest bucketed shape that holds a step of this size."""
        tokens = _pick(self.token_buckets, num_tokens, "tokens")
        seqs = self.seqs_for(tokens)
        if num_seqs > seqs:
            raise ValueError(f"{num_seqs} sequences exceed the bucket of {seqs}")
        return StepShape(tokens, seqs, _pick(self.context_buckets, num_blocks, "KV blocks"))

    def all_shapes(self) -> list[StepShape]:
        """Every shape a step can take: the programs compiled at start-up."""
        return [
            StepShape(t, self.seqs_for(t), w)
            for t in self.token_buckets
            for w in self.context_buckets
        ]
