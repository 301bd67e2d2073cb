"""The plain data a step passes between scheduler, executor and back."""

from __future__ import annotations

from dataclasses import dataclass, field

from tessellm.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step: which tokens to compute, where their KV lives."""

    request_id: str
    token_ids: list[int]  # the tokens computed this step
    start_pos: int  # position of token_ids[0]
    block_ids: list[int]
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    params: SamplingParams
    num_output_tokens: int = 0
    # History for penalties and min_tokens (empty when the request uses neither).
    output_token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class StepResult:
    """Sampled tokens for the seqs with ``sample=True``, in plan order."""

    sampled_token_ids: list[int]
    # Per sampled seq: (sampled token logprob, [(token_id, logprob), ...] top-k) or None.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    # Per seq: prompt logprobs for this chunk's tokens (position i scores token i+1).
    prompt_logprobs: dict[str, list[tuple[float, list[tuple[int, float]]]]] | None = None
