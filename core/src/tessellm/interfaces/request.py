"""A request as the scheduler and the KV cache manager see it: tokens, progress, blocks and
status. It crosses the scheduler and KV cache manager seams (``tessellm.interfaces.engine``)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tessellm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life; the ``FINISHED_*`` values are its finish reasons."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(slots=True, eq=False)
class Request:
    """One sequence to generate (an ``n > 1`` request is ``n`` of these).

    The engine creates it; the scheduler owns its progress (``status``,
    ``num_computed_tokens``, ``output_token_ids``); the KV cache manager owns
    ``block_ids`` (and ``block_hashes``, its prefix-cache bookkeeping).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0  # lower runs first under the "priority" policy, as in vLLM
    arrival_time: float = field(default_factory=time.monotonic)
    # For the samples of an ``n > 1`` request: the sibling that computes the shared prompt
    # (and its prompt logprobs); the others take its blocks as prefix hits, or, where
    # recurrent state has no prefix cache, are forked from it (engine/sample_fork.py).
    prompt_leader_id: str | None = None
    # Mixed into the first block's hash: requests with different salts never share KV.
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (or scheduled to be written this step).
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 before that
    # Written by the KV cache manager: the blocks holding this request's KV, in order
    # (block ``i`` holds positions ``i * block_size`` up to the next block).
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    arrival_index: int = 0  # set by the scheduler: breaks ties between equal ranks
    # Speculative decoding: draft tokens a proposer guessed to follow the known tokens,
    # set before ``schedule()``; the scheduler takes them into the next step (or drops them).
    spec_token_ids: list[int] = field(default_factory=list)
    # The LoRA adapter it runs with (tessellm.lora.LoRARequest), None for the base model.
    lora_request: Any = None
    # Written by the KV cache manager where the model's cache layout has several KV groups
    # (engine/cache_layout.py): the block tables of groups 1.. (group 0's is block_ids),
    # and the recurrent-state slot the request holds while it runs (-1: none).
    group_block_ids: list[list[int]] = field(default_factory=list)
    state_slot: int = -1
    # Images of the prompt (tessellm.interfaces.multimodal.ImageInput), in prompt order.
    mm_inputs: list[Any] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
