"""Verifying speculative drafts in the target model's step (``interfaces.speculative``).

A seq with ``d`` drafts has ``d + 1`` logits rows: row ``p`` predicts the token after its
``p``-th input token, so it scores draft ``p`` and, if every draft before it was accepted,
is where the seq's own next token comes from. Each row is processed as the same request
would be had it generated the drafts before it (penalties and ``min_tokens`` see them), so
a row's target distribution is exactly the one a step without speculation would sample
from at that position.

Greedy rows keep drafts while they equal the row's argmax. Sampled rows accept draft ``x``
with probability ``p(x)`` (uniform noise from the request's seeded generator where it has
a seed) and, at the first rejection, draw from ``p`` without ``x``, renormalised; after the
last draft, from ``p``. Drafts are point proposals (``q(x) = 1``), so this is the standard
rejection rule, ``min(1, p/q)`` to accept and ``max(0, p - q)`` to resample, and the
tokens are distributed exactly as the target's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tessellm.engine.sampler import Sampler, greedy_tokens, token_logprobs
from tessellm.engine.transfer import to_device
from tessellm.interfaces.schedule import ScheduledSeq, StepResult, TokenLogprobs

# Keeps the acceptance draws' seeds apart from the sampling noise's (Sampler.noise).
ACCEPT_SALT = 1
RESAMPLE_SALT = 2


def expand_rows(seqs: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[int]]:
    """One seq per logits row, and the draft token each row scores (-1: none, a seq's last
    row). Row ``p`` of a seq with drafts is that seq with its first ``p`` drafts generated
    (its output history, when it keeps one, includes them)."""
    rows: list[ScheduledSeq] = []
    scored: list[int] = []
    for seq in seqs:
        drafts = seq.draft_token_ids
        rows.append(seq)
        scored.extend(drafts)
        scored.append(-1)
        for p in range(1, len(drafts) + 1):
            history = seq.output_token_ids + drafts[:p] if seq.output_token_ids else []
            rows.append(
                replace(
                    seq,
                    num_output_tokens=seq.num_output_tokens + p,
                    output_token_ids=history,
                )
            )
    return rows, scored


def verify_drafts(sampler: Sampler, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> StepResult:
    """The tokens each sampled seq produces this step. ``logits`` has ``1 + len(drafts)``
    rows per seq of ``seqs`` (the sampled seqs, in plan order)."""
    rows, scored = expand_rows(seqs)
    raw, processed = sampler.processed_logits(logits, rows)
    greedy = greedy_tokens(processed).tolist()
    sampled_rows = [i for i, r in enumerate(rows) if r.params.temperature != 0]
    accept_prob: list[float] = []
    uniform: list[float] = []
    resampled: list[int] = []
    if sampled_rows:
        accept_prob, uniform, resampled = _draw(sampler, processed, rows, scored, sampled_rows)
    position = {row: i for i, row in enumerate(sampled_rows)}

    tokens: list[int] = []
    accepted: list[int] = []
    emitted_rows: list[int] = []
    emitted_tokens: list[int] = []
    base = 0
    for seq in seqs:
        drafts = seq.draft_token_ids
        num = 0
        if seq.params.temperature == 0:
            while num < len(drafts) and greedy[base + num] == drafts[num]:
                num += 1
            token = greedy[base + num]
        else:
            while num < len(drafts):
                at = position[base + num]
                if not uniform[at] < accept_prob[at]:
                    break
                num += 1
            token = resampled[position[base + num]]
        tokens.append(token)
        accepted.append(num)
        if seq.params.logprobs is not None:
            emitted_rows.extend(range(base, base + num + 1))
            emitted_tokens.extend([*drafts[:num], token])
        base += len(drafts) + 1

    result = StepResult(tokens, num_accepted_drafts=accepted)
    if emitted_rows:
        _add_logprobs(result, raw, seqs, emitted_rows, emitted_tokens)
    return result


def _draw(
    sampler: Sampler,
    processed: torch.Tensor,
    rows: list[ScheduledSeq],
    scored: list[int],
    sampled_rows: list[int],
) -> tuple[list[float], list[float], list[int]]:
    """For the sampled rows: the probability of each row's draft (1.0 for a seq's last
    row, which has none), a uniform draw to compare it with, and a token drawn from the
    row's distribution without its draft."""
    device = processed.device
    picked = [rows[i] for i in sampled_rows]
    index = to_device(torch.tensor(sampled_rows), device)
    probs = sampler.distribution(processed[index], picked)
    draft_of = [scored[i] for i in sampled_rows]
    has_draft = torch.tensor([t >= 0 for t in draft_of], device=device)
    draft_ids = to_device(torch.tensor([max(t, 0) for t in draft_of]), device)
    p_draft = probs.gather(1, draft_ids[:, None]).squeeze(1)
    accept_prob = torch.where(has_draft, p_draft, torch.ones_like(p_draft))
    # Exp(1) noise u gives exp(-u) ~ U(0, 1): one seeded-generator scheme for both draws.
    uniform = torch.exp(-sampler.noise(p_draft[:, None], picked, ACCEPT_SALT)).squeeze(1)
    residual = probs.scatter(1, draft_ids[:, None], 0.0)
    residual = torch.where(has_draft[:, None], residual, probs)
    resampled = (residual / sampler.noise(residual, picked, RESAMPLE_SALT)).argmax(dim=-1)
    return accept_prob.tolist(), uniform.tolist(), resampled.tolist()


def _add_logprobs(
    result: StepResult,
    raw: torch.Tensor,
    seqs: list[ScheduledSeq],
    emitted_rows: list[int],
    emitted_tokens: list[int],
) -> None:
    """Logprobs (of the raw distribution, as without speculation) of every token the seqs
    that ask for them emitted: the accepted drafts' go to ``draft_logprobs``."""
    device = raw.device
    index = to_device(torch.tensor(emitted_rows), device)
    wanted = [s for s in seqs if s.params.logprobs is not None]
    num_top = [
        s.params.logprobs or 0
        for s, count in zip(wanted, _counts(result, seqs), strict=True)
        for _ in range(count)
    ]
    entries = token_logprobs(
        raw[index].log_softmax(dim=-1), to_device(torch.tensor(emitted_tokens), device), num_top
    )
    logprobs: list[TokenLogprobs | None] = []
    draft_logprobs: list[list[TokenLogprobs] | None] = []
    at = 0
    for seq, num in zip(seqs, result.num_accepted_drafts or [], strict=True):
        if seq.params.logprobs is None:
            logprobs.append(None)
            draft_logprobs.append(None)
            continue
        draft_logprobs.append(entries[at : at + num])
        logprobs.append(entries[at + num])
        at += num + 1
    result.logprobs = logprobs
    result.draft_logprobs = draft_logprobs


def _counts(result: StepResult, seqs: list[ScheduledSeq]) -> list[int]:
    """Tokens emitted by each seq that asks for logprobs."""
    accepted = result.num_accepted_drafts or []
    return [num + 1 for s, num in zip(seqs, accepted, strict=True) if s.params.logprobs is not None]
