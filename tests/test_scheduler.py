"""Scheduler + KV cache manager without a model: a fake runner simulates the paged KV.

The fake runner writes, for every computed token, the identity of the whole prefix that
token's KV depends on into the slot its block table names, then checks that every
position a sequence attends to holds its own prefix. Stale, shared-by-mistake or never
written KV (a wrong prefix hit, a block reused too early) fails that check.
"""

from __future__ import annotations

import pytest

from tessellm.engine.kv_cache_manager import KVCacheManager
from tessellm.engine.scheduler import Scheduler, SchedulerConfig
from tessellm.errors import InvalidRequestError
from tessellm.interfaces.request import Request, RequestStatus
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.sampling_params import SamplingParams

VOCAB = 50


def fake_next_token(prefix: tuple[int, ...]) -> int:
    """A deterministic stand-in for the model: the next token depends on the whole prefix."""
    return (hash(prefix) % (VOCAB - 3)) + 3


class FakeRunner:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.kv.block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def execute(self, plan: SchedulerOutput) -> StepResult:
        bs = self.block_size
        truth = {
            s.request_id: self.scheduler.requests[s.request_id].all_token_ids for s in plan.seqs
        }
        # Writes of the whole batch precede reads, as in every attention layer.
        for seq in plan.seqs:
            tokens = truth[seq.request_id]
            for i, token in enumerate(seq.token_ids):
                pos = seq.start_pos + i
                assert tokens[pos] == token, "scheduled a token out of order"
                self.slots[(seq.block_ids[pos // bs], pos % bs)] = tuple(tokens[: pos + 1])
        sampled = []
        for seq in plan.seqs:
            tokens = truth[seq.request_id]
            end = seq.start_pos + len(seq.token_ids)
            for pos in range(end):
                held = self.slots.get((seq.block_ids[pos // bs], pos % bs))
                assert held == tuple(tokens[: pos + 1]), f"{seq.request_id}: bad KV at {pos}"
            if seq.sample:
                sampled.append(fake_next_token(tuple(tokens[:end])))
        return StepResult(sampled)


def make_scheduler(num_blocks=64, block_size=4, budget=64, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, config.pop("enable_prefix_caching", True))
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_model_len=1024, **config)
    return Scheduler(cfg, kv)


def make_request(request_id, prompt, max_tokens=4, priority=0, **params) -> Request:
    params.setdefault("ignore_eos", True)
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(request_id, list(prompt), sp, priority=priority)


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    plan = scheduler.schedule()
    assert plan.num_batched_tokens <= scheduler.config.max_num_batched_tokens or len(plan.seqs) == 1
    scheduler.update(plan, runner.execute(plan))
    return plan


def run_to_end(
    scheduler: Scheduler, runner: FakeRunner | None = None, max_steps: int = 500
) -> list[SchedulerOutput]:
    runner = runner or FakeRunner(scheduler)
    plans = []
    while scheduler.has_unfinished():
        plans.append(step(scheduler, runner))
        assert len(plans) < max_steps, "the scheduler is not making progress"
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks
    return plans


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_next_token(tuple(tokens)))
    return tokens[len(prompt) :]


def test_batches_under_the_token_budget():
    sched = make_scheduler(budget=16)
    reqs = [make_request(f"r{i}", range(10 * i, 10 * i + 10)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    plan = sched.schedule()
    assert plan.num_batched_tokens == 16
    assert [(s.request_id, len(s.token_ids)) for s in plan.seqs] == [("r0", 10), ("r1", 6)]
    assert [s.sample for s in plan.seqs] == [True, False]
    assert [r.request_id for r in sched.waiting] == ["r2"]
    runner = FakeRunner(sched)
    sched.update(plan, runner.execute(plan))
    assert reqs[1].num_computed_tokens == 6
    run_to_end(sched, runner)
    assert all(r.output_token_ids == reference_output(r.prompt_token_ids, 4) for r in reqs)


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", [i + 3] * 3))
    plan = sched.schedule()
    assert len(plan.seqs) == 2
    assert len(sched.waiting) == 2


def decoding_then_a_long_prompt(sched: Scheduler, runner: FakeRunner) -> Request:
    """A short request past its prompt, then a 40-token prompt ("long") waiting; the
    short one."""
    short = make_request("short", [5, 6, 7], max_tokens=20)
    sched.add_request(short)
    step(sched, runner)
    sched.add_request(make_request("long", range(3, 43), max_tokens=2))
    return short


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched = make_scheduler(budget=8)
    runner = FakeRunner(sched)
    short = decoding_then_a_long_prompt(sched, runner)
    chunks = []
    while sched.requests["long"].num_computed_tokens < 40:
        before = len(short.output_token_ids)
        plan = step(sched, runner)
        assert len(short.output_token_ids) == before + 1, "a decode was starved"
        chunks.append(next(len(s.token_ids) for s in plan.seqs if s.request_id == "long"))
    assert chunks == [7] * 5 + [5]


def test_decodes_go_first_even_behind_a_higher_priority_prompt():
    sched = make_scheduler(budget=8, policy="priority")
    runner = FakeRunner(sched)
    low = make_request("low", [5, 6, 7], max_tokens=20, priority=5)
    sched.add_request(low)
    step(sched, runner)
    sched.add_request(make_request("high", range(3, 43), max_tokens=2, priority=0))
    for _ in range(4):
        before = len(low.output_token_ids)
        step(sched, runner)
        assert len(low.output_token_ids) == before + 1


def test_without_chunking_a_prompt_waits_for_a_step_of_its_own():
    sched = make_scheduler(budget=8, enable_chunked_prefill=False)
    sched.add_request(make_request("a", [3, 4, 5]))
    sched.add_request(make_request("b", range(3, 23)))
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["a"]
    runner = FakeRunner(sched)
    sched.update(plan, runner.execute(plan))
    plan = sched.schedule()
    assert [(s.request_id, len(s.token_ids)) for s in plan.seqs] == [("a", 1)]
    run_to_end(sched, runner)


def test_preemption_recomputes_the_latest_request_with_identical_results():
    # 7 blocks of 4 tokens: two requests growing to 26 tokens each cannot both fit.
    sched = make_scheduler(num_blocks=7, block_size=4)
    first = make_request("first", range(3, 9), max_tokens=20)
    second = make_request("second", range(20, 26), max_tokens=20)
    sched.add_request(first)
    sched.add_request(second)
    plans = run_to_end(sched)
    preempted = [rid for p in plans for rid in p.preempted_ids]
    assert preempted and set(preempted) == {"second"}
    assert sched.counters.num_preemptions == len(preempted) == second.num_preemptions
    assert first.num_preemptions == 0
    for r in (first, second):
        assert r.output_token_ids == reference_output(r.prompt_token_ids, 20)
        assert r.status is RequestStatus.FINISHED_LENGTH


def test_priority_orders_the_queue_and_preempts_lower_priority():
    sched = make_scheduler(num_blocks=4, block_size=4, policy="priority")
    runner = FakeRunner(sched)
    sched.add_request(make_request("low", range(3, 13), max_tokens=30, priority=9))
    step(sched, runner)
    sched.add_request(make_request("mid", range(13, 23), priority=5))
    sched.add_request(make_request("high", range(23, 33), priority=1))
    assert [r.request_id for r in sched.waiting] == ["high", "mid"]
    plan = step(sched, runner)
    assert plan.preempted_ids == ["low"]
    assert [s.request_id for s in plan.seqs] == ["high"]
    run_to_end(sched, runner)


def test_fcfs_never_lets_a_waiting_request_preempt():
    sched = make_scheduler(num_blocks=4, block_size=4)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", range(3, 13), max_tokens=30))
    step(sched, runner)
    sched.add_request(make_request("b", range(13, 23)))
    plan = step(sched, runner)
    assert plan.preempted_ids == [] and [s.request_id for s in plan.seqs] == ["a"]


def test_priority_needs_the_priority_policy():
    with pytest.raises(InvalidRequestError, match="scheduling_policy='priority'"):
        make_scheduler().add_request(make_request("r", [3, 4], priority=2))


def test_prompt_that_can_never_fit_is_rejected():
    sched = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        sched.add_request(make_request("big", range(3, 19)))
    sched.add_request(make_request("ok", range(3, 18)))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add_request(make_request("ok", [3]))


def test_growth_beyond_the_whole_cache_stops_with_length():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens in all
    req = make_request("r", range(3, 13), max_tokens=100)
    sched.add_request(req)
    run_to_end(sched, max_steps=20)
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert req.num_tokens == 16


def test_abort_and_stop_free_blocks():
    sched = make_scheduler(num_blocks=8)
    runner = FakeRunner(sched)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", range(3 + i, 12 + i), max_tokens=10))
    step(sched, runner)
    assert sched.kv.num_free_blocks < 8
    (aborted,) = sched.abort_requests(["r1"])
    assert aborted.status is RequestStatus.FINISHED_ABORTED and aborted.block_ids == []
    sched.finish_requests(["r0"], RequestStatus.FINISHED_STOPPED)
    assert sched.abort_requests(["r0", "unknown"]) == []
    run_to_end(sched, runner)


def test_eos_stop_token_ids_and_min_tokens():
    sched = make_scheduler()
    runner = FakeRunner(sched)
    out = reference_output([3, 4, 5], 6)
    eos = make_request("eos", [3, 4, 5], max_tokens=6, ignore_eos=False)
    eos.eos_token_ids = frozenset({out[1]})
    stop = make_request("stop", [3, 4, 5], max_tokens=6, stop_token_ids=[out[0]], min_tokens=2)
    for r in (eos, stop):
        sched.add_request(r)
    while sched.has_unfinished():
        step(sched, runner)
    assert eos.output_token_ids == out[:2] and eos.stop_reason is None
    assert eos.status is RequestStatus.FINISHED_STOPPED
    # The stop token came first at output 1, before min_tokens: generation went on.
    assert len(stop.output_token_ids) > 1
    assert stop.status is (
        RequestStatus.FINISHED_STOPPED if out[0] in out[2:] else RequestStatus.FINISHED_LENGTH
    )


def test_prefix_hits_skip_compute_and_are_counted():
    sched = make_scheduler(block_size=4)
    system = list(range(3, 23))  # 20 tokens: five full blocks
    sched.add_request(make_request("a", [*system, 30, 31]))
    run_to_end(sched)
    sched.add_request(make_request("b", [*system, 40, 41, 42]))
    plan = sched.schedule()
    assert plan.seqs[0].start_pos == 20 and len(plan.seqs[0].token_ids) == 3
    stats = sched.stats()
    assert stats["prefix_cache_hit_tokens"] == 20
    assert stats["prefix_cache_queried_tokens"] == 22 + 23
    assert stats["prefix_cache_hit_rate"] == pytest.approx(20 / 45)


def test_same_step_prefix_hits_when_sent_together():
    sched = make_scheduler(block_size=4, budget=64)
    system = list(range(3, 23))
    reqs = [make_request(f"r{i}", [*system, 30 + i]) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    plan = sched.schedule()
    assert [len(s.token_ids) for s in plan.seqs] == [21, 1, 1, 1]
    runner = FakeRunner(sched)
    sched.update(plan, runner.execute(plan))
    run_to_end(sched, runner)
    assert all(r.output_token_ids == reference_output(r.prompt_token_ids, 4) for r in reqs)


def test_parallel_samples_compute_the_prompt_once():
    sched = make_scheduler(block_size=4, budget=6)
    prompt = list(range(3, 13))  # 10 tokens: 8 shareable (two full blocks)
    leader = make_request("p#0", prompt)
    sched.add_request(leader)
    for i in (1, 2):
        sibling = make_request(f"p#{i}", prompt)
        sibling.prompt_leader_id = "p#0"
        sched.add_request(sibling)
    first = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["p#0"]  # siblings wait for the leader
    runner = FakeRunner(sched)
    sched.update(first, runner.execute(first))
    run_to_end(sched, runner)
    # 10 by the leader, then only the unshareable tail (2 tokens) by each sibling.
    assert sched.counters.num_computed_prompt_tokens == 10 + 2 + 2
    assert sched.counters.prefix_cache_hit_tokens == 16


def test_prompt_logprobs_take_no_prefix_hits_and_cover_every_position():
    sched = make_scheduler(block_size=4, budget=5)
    prompt = list(range(3, 15))
    runner = FakeRunner(sched)
    sched.add_request(make_request("warm", prompt))
    run_to_end(sched, runner)
    req = make_request("lp", prompt, prompt_logprobs=1)
    sched.add_request(req)
    targets: list[tuple[int, int]] = []
    while sched.has_unfinished():
        plan = sched.schedule()
        for s in plan.seqs:
            targets += [(s.start_pos + 1 + i, t) for i, t in enumerate(s.prompt_logprob_token_ids)]
        sched.update(plan, runner.execute(plan))
    assert req.num_cached_tokens == 0
    assert targets == [(pos, prompt[pos]) for pos in range(1, len(prompt))]


def test_blocks_a_preempted_request_never_filled_leave_the_cache():
    # bs 2: "victim" fills positions 0-9, then its last chunk (10-12) publishes block 5.
    # "urgent" needs one block, preempts it before that step runs and takes block 6 (the
    # tail goes first); block 5 stays in the free queue and must not be found again.
    sched = make_scheduler(num_blocks=7, block_size=2, budget=10, policy="priority")
    runner = FakeRunner(sched)
    victim = make_request("victim", range(3, 16), max_tokens=1, priority=5)
    sched.add_request(victim)
    step(sched, runner)
    sched.add_request(make_request("urgent", [40, 41], max_tokens=1, priority=0))
    plan = step(sched, runner)
    assert plan.preempted_ids == ["victim"]
    assert [s.request_id for s in plan.seqs] == ["urgent"]
    plan = step(sched, runner)
    assert plan.seqs[0].start_pos == 10  # blocks 0-4 are real hits, block 5 is not
    run_to_end(sched, runner)
    assert victim.output_token_ids == reference_output(victim.prompt_token_ids, 1)


def test_admission_that_preempts_looks_its_prefix_up_again():
    # "urgent" shares the victim's first 12 tokens: before the preemption it would hit
    # block 5, which the victim's undone chunk was to fill. After it, only blocks 0-4.
    sched = make_scheduler(num_blocks=7, block_size=2, budget=10, policy="priority")
    runner = FakeRunner(sched)
    sched.add_request(make_request("victim", range(3, 16), max_tokens=1, priority=5))
    step(sched, runner)
    urgent = make_request("urgent", [*range(3, 15), 40], max_tokens=1, priority=0)
    sched.add_request(urgent)
    plan = step(sched, runner)
    assert plan.preempted_ids == ["victim"]
    assert [(s.request_id, s.start_pos) for s in plan.seqs] == [("urgent", 10)]
    assert urgent.num_cached_tokens == 10
    run_to_end(sched, runner)
