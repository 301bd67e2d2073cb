"""Sampling inside the step's compiled program, with per-row parameters as tensors.

Two program kinds per shape: ``greedy`` (an argmax) and ``random`` (temperature, min-p,
top-k and top-p through core's sort-based mask, then the exponential race, greedy rows
kept as their argmax). Which one a step runs is the only host decision; every
parameter is data, so a step of any mix compiles nothing new.

A request that needs what the program does not do (logprobs, penalties, logit bias,
``min_tokens`` still pending, a grammar's bitmask, its own seed) is sampled on the host
by core's sampler from the step's logits, which every program returns: the same
results as on the CPU, at the cost of copying ``[seqs, vocab]`` logits to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from tessellm.engine.sampler import mask_min_p_top_k_top_p
from tessellm.interfaces.schedule import ScheduledSeq

GREEDY = "greedy"
RANDOM = "random"
KINDS = (GREEDY, RANDOM)


def needs_host_sampling(seq: ScheduledSeq) -> bool:
    """What the compiled sampler does not do for this sequence's next token."""
    p = seq.params
    return (
        p.logprobs is not None
        or bool(p.logit_bias)
        or seq.num_output_tokens < p.min_tokens
        or p.presence_penalty != 0
        or p.frequency_penalty != 0
        or p.repetition_penalty != 1
        or seq.token_bitmask is not None
        or (p.seed is not None and p.temperature != 0)
    )


def sampling_rows(
    seqs: list[ScheduledSeq],
) -> tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]:
    """The program kind for these sequences and their (greedy, temperature, top_k,
    top_p, min_p) rows (None: every row greedy)."""
    if all(s.params.temperature == 0 for s in seqs):
        return GREEDY, None
    params = [s.params for s in seqs]
    return RANDOM, (
        np.array([p.temperature == 0 for p in params], dtype=np.int32),
        np.array([p.temperature or 1.0 for p in params], dtype=np.float32),
        np.array([p.top_k for p in params], dtype=np.int32),
        np.array([p.top_p for p in params], dtype=np.float32),
        np.array([p.min_p for p in params], dtype=np.float32),
    )


def sample_on_device(
    kind: str,
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits`` ``[S, vocab]`` (int32), traced into the step."""
    argmax = logits.argmax(dim=-1)
    if kind == GREEDY:
        return argmax.int()
    scaled = logits.float() / temperature[:, None]
    masked = mask_min_p_top_k_top_p(scaled, top_k.long(), top_p, min_p)
    probs = masked.softmax(dim=-1)
    # The exponential race (as core's sampler): argmax(p / q), q ~ Exp(1), from XLA's
    # generator (its seed is device data: no recompilation per step).
    noise = -torch.log(torch.rand_like(probs).clamp_min(torch.finfo(torch.float32).tiny))
    sampled = (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    return torch.where(greedy.bool(), argmax, sampled).int()
