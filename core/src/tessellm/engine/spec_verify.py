"""Verifying speculative drafts in the target model's step (``interfaces.speculative``).

A seq with ``d`` drafts has ``d + 1`` logits rows: row ``p`` predicts the token after its
``p``-th input token. Each row is sampled exactly as a step without speculation would
sample that position had the drafts before it been generated: penalties and
``min_tokens`` see them, and a seeded request's noise comes from (seed, position), as
always. A draft is kept while it equals its row's token; the seq's own token is that of
the first row whose draft differs (or of its last row).

That is the rejection rule for drafts that are point proposals, coupled to the sampler's
noise: draft ``x`` is kept with probability ``p(x)`` (the chance the row samples ``x``),
and a rejected position emits the row's token, which is then distributed as ``p`` without
``x``, renormalised. So the emitted tokens are not only distributed as the target's: they
are the very tokens the same request would get without speculation (greedy, and seeded
sampling too, whatever the batch), which is what the tests check.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tessellm.engine.sampler import Sampler
from tessellm.interfaces.schedule import ScheduledSeq, StepResult, TokenLogprobs


def expand_rows(seqs: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """One seq per logits row: row ``p`` of a seq with drafts is that seq with its first
    ``p`` drafts generated (its output history, when it keeps one, includes them)."""
    rows: list[ScheduledSeq] = []
    for seq in seqs:
        drafts = seq.draft_token_ids
        rows.append(seq)
        for p in range(1, len(drafts) + 1):
            history = seq.output_token_ids + drafts[:p] if seq.output_token_ids else []
            rows.append(
                replace(seq, num_output_tokens=seq.num_output_tokens + p, output_token_ids=history)
            )
    return rows


def verify_drafts(sampler: Sampler, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> StepResult:
    """The tokens each sampled seq produces this step. ``logits`` has ``1 + len(drafts)``
    rows per seq of ``seqs`` (the sampled seqs, in plan order)."""
    row_tokens, row_logprobs = sampler.sample(logits, expand_rows(seqs))
    tokens_per_row = row_tokens.tolist()
    tokens: list[int] = []
    accepted: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    draft_logprobs: list[list[TokenLogprobs] | None] = []
    base = 0
    for seq in seqs:
        drafts = seq.draft_token_ids
        num = 0
        while num < len(drafts) and tokens_per_row[base + num] == drafts[num]:
            num += 1
        tokens.append(tokens_per_row[base + num])
        accepted.append(num)
        if row_logprobs is not None:
            own = row_logprobs[base : base + num + 1]
            logprobs.append(own[-1])
            draft_logprobs.append(None if own[-1] is None else own[:-1])  # type: ignore[arg-type]
        base += len(drafts) + 1
    if row_logprobs is None:
        return StepResult(tokens, num_accepted_drafts=accepted)
    return StepResult(tokens, logprobs, num_accepted_drafts=accepted, draft_logprobs=draft_logprobs)
