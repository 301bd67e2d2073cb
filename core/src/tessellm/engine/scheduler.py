"""Continuous batching under a token budget, with chunked prefill and preemption.

Every step each running request advances by some number of tokens: one decode token, or
the next chunk of its prompt (or of its recompute after a preemption). Decodes are served
first and prompt chunks take the budget left, so a long prompt never stalls the requests
already generating. Waiting requests join when budget, ``max_num_seqs`` and blocks allow,
starting from whatever prefix the cache already holds. Unmixed (``mixed_batches`` False,
the CPU's default) a step with prompt work to plan plans only that, and the decodes wait
for a step without any: where compute is the bottleneck that gives first tokens sooner.

When the KV pool runs dry the running request that ranks last (latest arrival; under the
``priority`` policy the largest ``priority`` value, then latest arrival) is preempted: its
blocks are freed and it is recomputed later, with identical results (prefix caching
usually makes that cheap). Under ``priority`` a waiting request may also preempt running
requests that rank below it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from tessellm.engine.sample_fork import fork_sample
from tessellm.engine.scheduler_drafts import SpeculativePlanningMixin
from tessellm.engine.scheduler_results import SchedulerCounters, StepResultsMixin
from tessellm.errors import InvalidRequestError
from tessellm.interfaces import engine as seams
from tessellm.interfaces.engine import (
    PLACEHOLDER_TOKEN,
    Request,
    RequestStatus,
    ScheduledSeq,
    SchedulerConfig,
    SchedulerOutput,
)

# Scheduler._to_seq passes these positionally (keywords cost twice as much a sequence).
_SEQ_FIELDS = (
    "request_id token_ids start_pos block_ids sample params num_output_tokens "
    "output_token_ids prompt_token_ids eos_token_ids prompt_logprob_token_ids"
)
if " ".join(f.name for f in fields(ScheduledSeq)[: _SEQ_FIELDS.count(" ") + 1]) != _SEQ_FIELDS:
    raise ImportError("ScheduledSeq's fields changed: update Scheduler._to_seq")


@dataclass(slots=True)
class _StepDraft:
    budget: int
    # request id -> (the request, its new tokens this step)
    scheduled: dict[str, tuple[Request, int]] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    admitted_any: bool = False
    # Pipelining: the most sequences this plan takes (its share of the requests).
    max_seqs: int = 1 << 30
    # request id -> the speculative draft tokens it computes this step (after its last token)
    drafts: dict[str, list[int]] = field(default_factory=dict)


class Scheduler(SpeculativePlanningMixin, StepResultsMixin, seams.Scheduler):
    """The default scheduler (this module's docstring says how it plans a step)."""

    supports_schedule_ahead = True
    supports_speculation = True
    supports_concurrent_batches = True

    def __init__(self, config: SchedulerConfig, kv_cache_manager: seams.KVCacheManager) -> None:
        if config.policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {config.policy!r}")
        super().__init__(config, kv_cache_manager)
        self.kv = kv_cache_manager  # the short name: it is on every hot path
        self.waiting: list[Request] = []  # kept sorted by rank
        self.running: list[Request] = []  # kept sorted by rank too
        self.requests: dict[str, Request] = {}
        self.counters = SchedulerCounters()
        self._arrivals = itertools.count()
        # A sequence never outgrows the cache: it finishes ("length") when it would.
        self.capacity = kv_cache_manager.num_blocks * kv_cache_manager.block_size
        self.max_model_len = min(config.max_model_len, self.capacity)
        # Each running request needs at least one token of budget per step.
        self.max_running = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.pipelined = config.max_concurrent_batches > 1

    # -- queue management --------------------------------------------------------------
    def _rank(self, request: Request) -> tuple[int, int]:
        priority = request.priority if self.config.policy == "priority" else 0
        return (priority, request.arrival_index)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self._rank)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.max_model_len:
            where = (
                f"the KV cache ({self.capacity} tokens in {self.kv.num_blocks} blocks)"
                if self.capacity <= self.config.max_model_len
                else f"max_model_len ({self.config.max_model_len})"
            )
            raise InvalidRequestError(
                f"prompt of {request.num_prompt_tokens} tokens can never run: it leaves no "
                f"room to generate within {where}"
            )
        if request.priority != 0 and self.config.policy != "priority":
            raise InvalidRequestError(
                f"got priority {request.priority} but the scheduling policy is "
                f"{self.config.policy!r}; start the engine with scheduling_policy='priority'"
            )
        request.arrival_index = next(self._arrivals)
        self.requests[request.request_id] = request
        self._enqueue(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        done = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv.free(request)
            done.append(request)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        draft = _StepDraft(self.config.max_num_batched_tokens)
        # Decodes (one token left) first, then prompt chunks and recomputes, each by rank
        # (``running`` is in rank order, and the split keeps it).
        decodes: list[Request] = []
        chunks: list[Request] = []
        for request in self.running:
            left = (
                len(request.prompt_token_ids)
                + len(request.output_token_ids)
                - request.num_computed_tokens
            )
            (chunks if left > 1 else decodes).append(request)
        if self.pipelined:
            self._share_out(draft)
        # Unmixed (``mixed_batches`` False): prompt work first and alone; the decodes only
        # when there is none this step can plan (no blocks or room for a waiting request).
        prompts_alone = (
            not self.config.mixed_batches
            and not self.pipelined
            and bool(chunks or (self.waiting and len(self.running) < self.max_running))
        )
        self._plan_running(draft, chunks if prompts_alone else itertools.chain(decodes, chunks))
        # Admitting new work while the running set is short of blocks only thrashes.
        if not draft.preempted:
            self._admit_waiting(draft)
        if prompts_alone and not draft.scheduled:
            self._plan_running(draft, decodes)

        seqs = []
        total = computed_prompt = 0
        for request, num_new in draft.scheduled.values():
            start = request.num_computed_tokens
            num_prompt = len(request.prompt_token_ids)
            if start < num_prompt:
                computed_prompt += min(start + num_new, num_prompt) - start
            total += num_new
            seqs.append(self._to_seq(request, num_new, draft.drafts.get(request.request_id)))
        c = self.counters
        c.num_computed_prompt_tokens += computed_prompt
        c.last_step_tokens = total
        c.num_scheduled_tokens += total
        c.num_scheduled_steps += 1 if seqs else 0
        return SchedulerOutput(seqs, total, draft.preempted)

    def _plan_running(self, draft: _StepDraft, requests: Iterable[Request]) -> None:
        """Give running ``requests`` (in this order) their next tokens while the budget
        lasts, preempting the lowest-ranked where blocks run out."""
        kv = self.kv
        running = RequestStatus.RUNNING
        for request in requests:
            if draft.budget <= 0 or len(draft.scheduled) >= draft.max_seqs:
                break
            if request.status is not running:  # an earlier one preempted it
                continue
            if self.pipelined and self._in_flight(request):
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, draft.budget)
            if request.spec_token_ids:
                num_new += self._take_drafts(request, draft)
            while not kv.can_allocate(request, num_new):
                victim = self.running[-1]  # the lowest-ranked
                self._preempt(victim, draft)
                if victim is request:
                    break
            if request.status is running:
                kv.allocate(request, num_new + self._lookahead(request, num_new))
                draft.scheduled[request.request_id] = (request, num_new)
                draft.budget -= num_new

    def _admit_waiting(self, draft: _StepDraft) -> None:
        # The samples of an n > 1 request share its prompt without waiting rules: the
        # leader ranks first, a step has budget left after it only once its chunk reaches
        # the prompt's end, and by then its full blocks are published for the siblings.
        # Without a prefix cache for recurrent state they are forked then (no budget).
        while self.waiting and len(self.running) < self.max_running:
            if len(draft.scheduled) >= draft.max_seqs:
                return
            if not fork_sample(self, self.waiting[0], draft):
                if draft.budget <= 0:
                    return
                if self.pipelined and self._in_flight(self.waiting[0]):
                    return  # preempted while its token is computed: it resumes once it is in
                if not self._try_admit(self.waiting[0], draft):
                    return
            self.waiting.pop(0)
            draft.admitted_any = True

    def _share_out(self, draft: _StepDraft) -> None:
        """Pipelining: each plan in flight takes an equal share of the requests, so that
        every stage has work while the others run their plans (with all requests in one
        plan, the next would find them all in flight and the stages would take turns)."""
        batches = self.config.max_concurrent_batches
        runnable = min(len(self.running) + len(self.waiting), self.max_running)
        draft.max_seqs = max(1, -(-runnable // batches))

    @staticmethod
    def _in_flight(request: Request) -> bool:
        """Pipelining: its last token is a placeholder, sampled by a plan still in flight."""
        outputs = request.output_token_ids
        return bool(outputs) and outputs[-1] == PLACEHOLDER_TOKEN

    def _adapter_fits(self, request: Request) -> bool:
        """Multi-LoRA: whether admitting ``request`` keeps the running adapters within
        ``max_loras`` (every running request is in nearly every step)."""
        lora = request.lora_request
        if lora is None or not self.config.max_loras:
            return True
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request}
        return lora.lora_int_id in running or len(running) < self.config.max_loras

    def _try_admit(self, request: Request, draft: _StepDraft) -> bool:
        if not self._adapter_fits(request):
            return False  # it waits (first in line) until an adapter's requests finish
        while True:
            # Prompt logprobs need the logits of every prompt position: no cache hits.
            cached = (
                0 if self._wants_prompt_logprobs(request) else self.kv.get_computed_blocks(request)
            )
            request.num_computed_tokens = cached
            remaining = request.num_tokens - cached
            num_new = min(remaining, draft.budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                if draft.scheduled:
                    return self._give_back(request)
                num_new = remaining  # alone in the step: a prompt over budget must still run
            if self.kv.can_allocate(request, num_new):
                break
            # Look the prefix up again after a preemption: the victim's blocks that this
            # step would have filled are no longer valid hits.
            self._give_back(request)
            victim = self._priority_victim(request, draft)
            if victim is None:
                return False
            self._preempt(victim, draft)
        self.kv.allocate(request, num_new)
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=self._rank)
        draft.scheduled[request.request_id] = (request, num_new)
        draft.budget -= num_new
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = cached
        self.counters.prefix_cache_queried_tokens += request.num_tokens
        self.counters.prefix_cache_hit_tokens += cached
        return True

    def _give_back(self, request: Request) -> bool:
        """Undo a failed admission: return the prefix hits; it retries from scratch."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        return False

    def _priority_victim(self, request: Request, draft: _StepDraft) -> Request | None:
        """Under ``priority``: the lowest-ranked running request ranked below ``request``.
        Not once a waiting request has joined this step: it may hold prefix hits on blocks
        a victim publishes this step but would then never compute."""
        if self.config.policy != "priority" or draft.admitted_any or not self.running:
            return None
        victim = self.running[-1]
        return victim if self._rank(victim) > self._rank(request) else None

    def _preempt(self, victim: Request, draft: _StepDraft) -> None:
        self.running.remove(victim)
        self.kv.free(victim)  # before resetting progress: it says which blocks hold KV
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.counters.num_preemptions += 1
        victim.spec_token_ids = []
        draft.drafts.pop(victim.request_id, None)
        undone = draft.scheduled.pop(victim.request_id, None)
        if undone is not None:
            draft.budget += undone[1]
        draft.preempted.append(victim.request_id)
        self._enqueue(victim)

    @staticmethod
    def _wants_prompt_logprobs(request: Request) -> bool:
        # Siblings of an n > 1 request leave prompt logprobs to their leader.
        return request.params.prompt_logprobs is not None and request.prompt_leader_id is None

    def _to_seq(self, request: Request, num_new: int, drafts: list[int] | None) -> ScheduledSeq:
        start = request.num_computed_tokens
        end = start + num_new - (len(drafts) if drafts else 0)
        params = request.params
        prompt = request.prompt_token_ids
        outputs = request.output_token_ids
        num_prompt = len(prompt)
        num_tokens = num_prompt + len(outputs)
        needs_history = (
            params.presence_penalty
            or params.frequency_penalty
            or params.repetition_penalty != 1.0
            or params.min_tokens
        )
        targets: list[int] = []
        if self._wants_prompt_logprobs(request) and start < num_prompt - 1:
            targets = prompt[start + 1 : min(end, num_prompt - 1) + 1]
        # A decode's one token is the last output (the common case, kept cheap).
        decode = start == num_tokens - 1 and outputs
        token_ids = [outputs[-1]] if decode else request.token_slice(start, end)
        if drafts:
            token_ids += drafts
        # Positional, in _SEQ_FIELDS order.
        seq = ScheduledSeq(
            request.request_id,
            token_ids,
            start,
            list(request.block_ids),
            end == num_tokens,
            params,
            len(outputs),
            list(outputs) if needs_history else [],
            prompt if params.repetition_penalty != 1 else [],
            request.eos_token_ids,
            targets,
        )
        if drafts:
            seq.draft_token_ids = drafts
        elif not token_ids:  # a sample forked from its prompt's leader (sample_fork.py)
            seq.fork_of = request.prompt_leader_id
        if request.lora_request is not None:
            seq.lora_request = request.lora_request
        if request.group_block_ids:  # a layout with several KV groups (cache_layout.py)
            seq.group_block_ids = [list(t) for t in request.group_block_ids]
        seq.state_slot = request.state_slot
        if request.mm_inputs:
            seq.mm_inputs = [m for m in request.mm_inputs if m.offset < end and start < m.end]
        return seq

    def speculation_candidates(self) -> list[Request]:
        return [r for r in self.running if r.num_computed_tokens == r.num_tokens - 1]

    def stats(self) -> dict[str, float]:
        c = self.counters
        queried = c.prefix_cache_queried_tokens
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_preempted": sum(r.status is RequestStatus.PREEMPTED for r in self.waiting),
            "num_preemptions": c.num_preemptions,
            "kv_cache_usage": self.kv.usage(),
            "prefix_cache_hit_rate": c.prefix_cache_hit_tokens / queried if queried else 0.0,
            "prefix_cache_queried_tokens": queried,
            "prefix_cache_hit_tokens": c.prefix_cache_hit_tokens,
            "num_computed_prompt_tokens": c.num_computed_prompt_tokens,
            "last_step_tokens": c.last_step_tokens,
            "avg_tokens_per_step": (
                c.num_scheduled_tokens / c.num_scheduled_steps if c.num_scheduled_steps else 0.0
            ),
        }
