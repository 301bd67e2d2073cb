"""A launched step of the model runner: the tokens it samples on the device, fetched to
the host without waiting behind later work, and how the next step takes them in place of
its placeholders (schedule-ahead)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tessellm.engine.transfer import to_device
from tessellm.interfaces.schedule import PLACEHOLDER_TOKEN, SchedulerOutput, StepResult


class PendingStep:
    """A launched step; ``result()`` waits for its sampled tokens on the host.

    On a GPU the device-to-host copy is queued at launch, right behind the sampler, with
    an event after it: ``result()`` waits for that event only. Asking for the tokens later
    with ``.tolist()`` would queue the copy behind whatever was launched since (the next
    step, under the overlapped loop) and wait for that too, idling the GPU while the host
    then processes outputs.
    """

    __slots__ = ("_done", "_error", "_event", "_host_tokens", "_result", "_sampler", "tokens")

    def __init__(self, result: StepResult, tokens: torch.Tensor | None = None) -> None:
        self._result = result
        self._sampler: Callable[[], tuple[torch.Tensor, list | None]] | None = None
        self._error: Exception | None = None
        self._event: torch.cuda.Event | None = None
        self._host_tokens: torch.Tensor | None = None
        self._set_tokens(tokens)

    def _set_tokens(self, tokens: torch.Tensor | None) -> None:
        self.tokens = tokens  # on the device, one per sampled sequence in plan order
        self._done = tokens is None
        if tokens is not None and tokens.device.type == "cuda":
            self._host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host_tokens.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def defer(self, sampler: Callable[[], tuple[torch.Tensor, list | None]]) -> None:
        """Sample only when ``sample()`` (or ``result()``) is called."""
        self._sampler = sampler
        self._done = False

    def sample(self) -> None:
        """Queue a deferred sampling (reads the seqs' bitmasks now); idempotent. Its error
        is raised here and again by ``result()``."""
        if self._error is not None:
            raise self._error
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return
        try:
            tokens, logprobs = sampler()
        except Exception as exc:
            self._error = exc
            raise
        self._result.logprobs = logprobs
        self._set_tokens(tokens)

    def result(self) -> StepResult:
        self.sample()
        if not self._done:
            assert self.tokens is not None
            if self._event is not None and self._host_tokens is not None:
                self._event.synchronize()
                self._result.sampled_token_ids = self._host_tokens.tolist()
            else:
                self._result.sampled_token_ids = self.tokens.tolist()
            self._done = True
        return self._result


def feed_sampled_tokens(
    plan: SchedulerOutput,
    input_ids: torch.Tensor,
    previous_plan: SchedulerOutput,
    previous: PendingStep,
) -> None:
    """Put the previous step's sampled tokens, on the device, where ``plan`` has their
    placeholders: the last token of a sequence that sampled in the previous step."""
    rows: dict[str, int] = {}
    for seq in previous_plan.seqs:
        if seq.sample:
            rows[seq.request_id] = len(rows)
    targets: list[int] = []
    sources: list[int] = []
    end = 0
    for seq in plan.seqs:
        end += len(seq.token_ids)
        if seq.token_ids[-1] == PLACEHOLDER_TOKEN:
            targets.append(end - 1)
            sources.append(rows[seq.request_id])
    if targets:
        if previous.tokens is None:
            raise RuntimeError("a placeholder token, but the previous step sampled nothing")
        device = input_ids.device
        index = to_device(torch.tensor(targets), device)
        picked = previous.tokens[to_device(torch.tensor(sources), device)]
        input_ids.index_copy_(0, index, picked.to(input_ids.dtype))
