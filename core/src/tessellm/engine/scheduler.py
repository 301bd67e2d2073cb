"""Continuous batching under a token budget, with chunked prefill and preemption.

Every step each running request advances by some number of tokens: the rest of its
prompt (in chunks no larger than the budget left) or one decode token. Prompt and output
tokens are handled alike. When the KV pool runs dry the request that ranks last (latest
arrival, or lowest priority under the ``priority`` policy) is preempted: its blocks are
freed and it is recomputed later (prefix caching usually makes that cheap).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from tessellm.engine.kv_cache_manager import KVCacheManager
from tessellm.engine.request import Request, RequestStatus
from tessellm.engine.schedule import ScheduledSeq, SchedulerOutput, StepResult
from tessellm.errors import InvalidRequestError


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority"


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        if config.policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {config.policy!r}")
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.last_step_tokens = 0

    # -- queue management --------------------------------------------------------------
    def _rank(self, request: Request) -> tuple[int, float]:
        if self.config.policy == "priority":
            return (request.priority, request.arrival_time)
        return (0, request.arrival_time)

    def add_request(self, request: Request) -> None:
        capacity = self.kv.num_blocks * self.kv.block_size
        if request.num_prompt_tokens >= capacity:
            raise InvalidRequestError(
                f"prompt of {request.num_prompt_tokens} tokens can never fit the KV cache "
                f"({capacity} tokens in {self.kv.num_blocks} blocks)"
            )
        self.requests[request.request_id] = request
        if self.config.policy == "priority":
            # Keep the queue ordered; new arrivals of equal rank go behind earlier ones.
            items = sorted([*self.waiting, request], key=self._rank)
            self.waiting = deque(items)
        else:
            self.waiting.append(request)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        done = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self.kv.free(request)
            done.append(request)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ----------------------------------------------------------------------
    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _victim(self) -> Request:
        return max(self.running, key=self._rank)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, tuple[Request, int]] = {}
        preempted: list[str] = []

        for request in list(self.running):
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted by an earlier one
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.can_allocate(request, num_new):
                victim = self._victim()
                self._preempt(victim)
                preempted.append(victim.request_id)
                undone = scheduled.pop(victim.request_id, None)
                if undone is not None:
                    budget += undone[1]
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            self.kv.allocate(request, num_new)
            scheduled[request.request_id] = (request, num_new)
            budget -= num_new

        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if not request.block_ids:
                cached = self.kv.get_computed_blocks(request)
                request.num_computed_tokens = cached
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = cached
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                if scheduled:
                    break
                # Without chunking, a prompt larger than the budget could never start.
                num_new = remaining
            if not self.kv.can_allocate(request, num_new):
                # Give back the prefix hits; the request retries from scratch next step.
                self.kv.free(request)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.kv.allocate(request, num_new)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = (request, num_new)
            budget -= num_new

        seqs = [self._to_seq(request, n) for request, n in scheduled.values()]
        total = sum(n for _, n in scheduled.values())
        self.last_step_tokens = total
        return SchedulerOutput(seqs, total, preempted)

    @staticmethod
    def _to_seq(request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        end = start + num_new
        tokens = request.all_token_ids[start:end]
        params = request.params
        needs_history = (
            params.presence_penalty
            or params.frequency_penalty
            or params.repetition_penalty != 1.0
            or params.min_tokens
        )
        return ScheduledSeq(
            request_id=request.request_id,
            token_ids=tokens,
            start_pos=start,
            block_ids=list(request.block_ids),
            sample=end == request.num_tokens,
            params=params,
            num_output_tokens=len(request.output_token_ids),
            output_token_ids=list(request.output_token_ids) if needs_history else [],
            prompt_token_ids=request.prompt_token_ids if params.repetition_penalty != 1 else [],
            eos_token_ids=request.eos_token_ids,
        )

    def update(self, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance progress, append sampled tokens and finish what should stop."""
        changed: list[Request] = []
        sampled = iter(result.sampled_token_ids)
        now = time.monotonic()
        for seq in plan.seqs:
            request = self.requests.get(seq.request_id)
            token = next(sampled) if seq.sample else None
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += len(seq.token_ids)
            if token is None:
                continue
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            status = self._check_stop(request, token)
            changed.append(request)
            if status is not None:
                self.finish_requests([request.request_id], status)
        return changed

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
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
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_preemptions": self.num_preemptions,
            "kv_cache_usage": self.kv.usage(),
            "prefix_cache_hit_rate": self.kv.stats.hit_rate,
            "prefix_cache_queried_tokens": self.kv.stats.queried_tokens,
            "prefix_cache_hit_tokens": self.kv.stats.hit_tokens,
            "last_step_tokens": self.last_step_tokens,
        }
