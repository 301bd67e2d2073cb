"""Applying a step's result to the scheduler's requests: ``update`` (and, scheduled ahead,
``advance`` then ``fill``). Sampled tokens are appended (accepted speculative drafts
first), progress advances by what was computed, and requests that stop are finished."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tessellm.interfaces.engine import (
    PLACEHOLDER_TOKEN,
    Request,
    RequestStatus,
    RequestUpdateError,
    SchedulerOutput,
    StepResult,
)

if TYPE_CHECKING:
    from tessellm.engine.scheduler import Scheduler


@dataclass(slots=True)
class SchedulerCounters:
    """The default scheduler's running totals (its ``stats()``)."""

    num_preemptions: int = 0
    prefix_cache_queried_tokens: int = 0  # tokens of requests admitted (resumes included)
    prefix_cache_hit_tokens: int = 0  # of those, tokens found in the prefix cache
    num_computed_prompt_tokens: int = 0  # prompt positions computed (recomputes included)
    num_scheduled_tokens: int = 0
    num_scheduled_steps: int = 0
    last_step_tokens: int = 0


def _applied(changed: list[Request], errors: dict[str, Exception]) -> list[Request]:
    """What ``update``/``fill`` return, or ``RequestUpdateError`` naming the requests whose
    stop check raised (the others applied)."""
    if errors:
        raise RequestUpdateError([r for r in changed if r.request_id not in errors], errors)
    return changed


class StepResultsMixin:
    """The default scheduler's result-applying half (``Scheduler`` mixes it in)."""

    def update(self: Scheduler, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance progress, append sampled tokens and finish what should stop."""
        changed: list[Request] = []
        sampled = iter(result.sampled_token_ids)
        now = time.monotonic()
        requests = self.requests
        running = RequestStatus.RUNNING
        errors: dict[str, Exception] = {}
        accepted = result.num_accepted_drafts
        index = -1
        for seq in plan.seqs:
            request = requests.get(seq.request_id)
            token = next(sampled) if seq.sample else None
            index += seq.sample
            if request is None or request.status is not running:
                continue
            if seq.draft_token_ids and token is not None:
                # Computed: the seq's first token and the drafts accepted (not the rejected).
                num_accepted = accepted[index] if accepted is not None else 0
                request.num_computed_tokens += len(seq.token_ids) - len(seq.draft_token_ids)
                request.num_computed_tokens += num_accepted
                tokens = [*seq.draft_token_ids[:num_accepted], token]
            else:
                request.num_computed_tokens += len(seq.token_ids)
                if token is None:
                    continue
                tokens = [token]
            if request.first_token_time is None:
                request.first_token_time = now
            try:
                for token in tokens:
                    request.output_token_ids.append(token)
                    status = self._check_stop(request, token)
                    if status is not None:
                        self.finish_requests([request.request_id], status)
                        break
                changed.append(request)
            except Exception as exc:  # this request's own data: it fails alone
                errors[request.request_id] = exc
        return _applied(changed, errors)

    # -- schedule-ahead: the next step is scheduled before this one's tokens are known --
    def advance(self: Scheduler, plan: SchedulerOutput) -> None:
        """Count ``plan`` as computed before its sampled tokens are known: each sampling
        request gets a placeholder output token (``fill`` puts the real one in), so the
        next ``schedule()`` can run while the device still runs ``plan``."""
        requests = self.requests
        running = RequestStatus.RUNNING
        for seq in plan.seqs:
            request = requests.get(seq.request_id)
            if request is None or request.status is not running:
                continue
            request.num_computed_tokens += len(seq.token_ids)
            if seq.sample:
                request.output_token_ids.append(PLACEHOLDER_TOKEN)

    def rewind(self: Scheduler, plan: SchedulerOutput) -> None:
        """Undo ``advance(plan)`` (pipelining: a plan in flight when an earlier one failed;
        plans are rewound latest first). Progress goes back to the seq's start only where it
        still ends at the seq's end: a request preempted meanwhile has none left to undo."""
        for seq in plan.seqs:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            if request.num_computed_tokens == seq.start_pos + len(seq.token_ids):
                request.num_computed_tokens = seq.start_pos
            outputs = request.output_token_ids
            if seq.sample and outputs and outputs[-1] == PLACEHOLDER_TOKEN:
                outputs.pop()

    def fill(self: Scheduler, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Replace the placeholders that ``advance(plan)`` left with the sampled tokens and
        finish what should stop, as ``update`` does. A request that stops here may be in
        the step scheduled meanwhile: its token there is dropped (it is gone by then)."""
        changed: list[Request] = []
        errors: dict[str, Exception] = {}
        sampled = iter(result.sampled_token_ids)
        now = time.monotonic()
        for seq in plan.seqs:
            token = next(sampled) if seq.sample else None
            request = self.requests.get(seq.request_id)
            if token is None or request is None:
                continue
            outputs = request.output_token_ids
            if not outputs or outputs[-1] != PLACEHOLDER_TOKEN:
                continue  # it stopped before ``advance`` (a stop string, then re-added)
            outputs[-1] = token
            if request.first_token_time is None:
                request.first_token_time = now
            # Preempted by the schedule in between: the token still counts (its KV was
            # there when it was sampled); the recompute will see it.
            try:
                status = self._check_stop(request, token)
                changed.append(request)
                if status is not None:
                    self.finish_requests([request.request_id], status)
                elif request.status is RequestStatus.RUNNING:
                    self.kv.publish_filled(request)
            except Exception as exc:
                errors[request.request_id] = exc
        return _applied(changed, errors)

    def _check_stop(self: Scheduler, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
