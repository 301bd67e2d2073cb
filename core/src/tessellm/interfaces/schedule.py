"""The plain data a step passes between scheduler, executor and back.

All of it is plain dataclasses (picklable), so a plan goes to worker processes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tessellm.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

# One scored token: (its logprob, its rank in the vocabulary (1 = most likely),
# [(token id, logprob), ...] the top-k alternatives, most likely first).
TokenLogprobs = tuple[float, int, list[tuple[int, float]]]

PLACEHOLDER_TOKEN = -1
"""Stands for an output token sampled by a step still running on the device, when the next
step is scheduled before it is known (the engine's schedule-ahead loop):
``Scheduler.advance`` appends it to ``Request.output_token_ids``, so it may be the last
token of a ``ScheduledSeq``; an executor that ``feeds_sampled_tokens`` replaces it on the
device, and a KV cache manager that ``supports_schedule_ahead`` publishes no block it
completes until ``publish_filled``."""


@dataclass(slots=True)
class SchedulerConfig:
    """The limits the engine gives its scheduler (the scheduler's first constructor argument)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # tokens computed in one step, prompts included
    max_model_len: int = 4096  # prompt + output tokens of one request
    enable_chunked_prefill: bool = True  # a prompt may be split over several steps
    # False: a step with prompt work to plan (a running request's next chunk, or a waiting
    # request that can join) plans that alone, and decodes wait for a step without any.
    mixed_batches: bool = True
    policy: str = "fcfs"  # or "priority"
    # Speculative decoding: KV positions to reserve after a speculating request's last
    # token (num_speculative_tokens), whether or not it has that many drafts this step, so
    # a compiled verification step may pad every sequence to the same length.
    num_lookahead_slots: int = 0
    # Multi-LoRA: distinct adapters a step may hold (0: LoRA off, no limit to keep).
    max_loras: int = 0
    # Pipeline parallelism: plans in flight at once (Scheduler.supports_concurrent_batches).
    max_concurrent_batches: int = 1


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
    # Prompt logprobs: position ``start_pos + i`` of this chunk scores token
    # ``prompt_logprob_token_ids[i]`` (the prompt token after it). Empty: none wanted.
    prompt_logprob_token_ids: list[int] = field(default_factory=list)
    # Structured outputs: the tokens a grammar allows next (``sample`` seqs only), an int32
    # CPU row of ``bitmask_words(vocab_size)`` words, bit ``j`` of word ``i`` = token
    # ``32 * i + j`` (``interfaces.structured_output``). Filled by the engine at launch.
    token_bitmask: torch.Tensor | None = None
    # Speculative decoding: the draft tokens among ``token_ids`` (its last ones; ``sample``
    # seqs only). The step scores each and keeps the prefix the target agrees with
    # (``StepResult.num_accepted_drafts``).
    draft_token_ids: list[int] = field(default_factory=list)
    # The LoRA adapter its tokens run with (tessellm.lora.LoRARequest; None: the base).
    lora_request: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        row = self.token_bitmask
        if row is not None and row.untyped_storage().nbytes() > row.nbytes:
            # A view of the engine's bitmask buffer would carry the whole buffer to a
            # worker (Ray: 64 views of 64 rows at a 150k vocabulary, 77 MB a step).
            state["token_bitmask"] = row.clone()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    # Where the model's cache layout has several KV groups: the block tables of groups 1..
    # (``Request.group_block_ids``), and the request's recurrent-state slot (-1: none).
    group_block_ids: list[list[int]] = field(default_factory=list)
    state_slot: int = -1
    # The request's images whose placeholder positions this chunk covers, wholly or in
    # part (tessellm.interfaces.multimodal.ImageInput).
    mm_inputs: list[Any] = field(default_factory=list)
    # A sample of an ``n > 1`` request forked from its prompt's leader, the seq of this
    # request id in the same plan (``engine/sample_fork.py``): no ``token_ids``; after the
    # forward it gets a copy of the leader's recurrent state (and of the KV pages where
    # their tables differ), and samples its first token from the leader's last row.
    fork_of: str | None = None


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan (``Scheduler.schedule()``): what the executor computes."""

    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)  # preempted while planning it

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class StepResult:
    """Sampled tokens for the seqs with ``sample=True``, in plan order (one each; with
    speculative decoding, accepted drafts come before it)."""

    sampled_token_ids: list[int]
    # Per sampled seq (plan order): the sampled token's logprobs, or None when not asked.
    logprobs: list[TokenLogprobs | None] | None = None
    # Per request id: (prompt position of the first scored token, one entry per token).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] | None = None
    # Speculative decoding (a plan with draft tokens): per sampled seq, how many of its
    # drafts were accepted; they come before ``sampled_token_ids[i]`` in its output, and
    # ``draft_logprobs[i]`` (when logprobs are asked) has their logprobs.
    num_accepted_drafts: list[int] | None = None
    draft_logprobs: list[list[TokenLogprobs] | None] | None = None

    def emitted_token_ids(self, index: int, seq: ScheduledSeq) -> list[int]:
        """The tokens sampled seq ``index`` (``seq``) produced: its accepted drafts, then
        its sampled token."""
        token = self.sampled_token_ids[index]
        if self.num_accepted_drafts is None or not seq.draft_token_ids:
            return [token]
        return [*seq.draft_token_ids[: self.num_accepted_drafts[index]], token]
