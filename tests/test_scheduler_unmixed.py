"""``mixed_batches=False`` (the CPU's default): a step with prompt work plans that alone,
and decodes run in the steps without any; outputs are those of the mixed schedule."""

from __future__ import annotations

import pytest
from test_scheduler import (
    FakeRunner,
    decoding_then_a_long_prompt,
    make_request,
    make_scheduler,
    reference_output,
    run_to_end,
    step,
)

from tessellm import LLM
from tessellm.config import EngineArgs
from tessellm.engine.engine_setup import mixed_batches
from tessellm.plugins import get_plugins


def kinds(plan) -> set[str]:
    """ "prompt" for a seq computing prompt tokens (several, or its last), "decode" else."""
    return {
        "decode" if s.num_output_tokens and len(s.token_ids) == 1 else "prompt" for s in plan.seqs
    }


def test_a_new_request_is_prefilled_alone_then_everyone_decodes():
    sched = make_scheduler(mixed_batches=False)
    runner = FakeRunner(sched)
    first = make_request("first", [5, 6, 7], max_tokens=8)
    sched.add_request(first)
    step(sched, runner)  # its prompt
    assert kinds(step(sched, runner)) == {"decode"}
    sched.add_request(make_request("second", [8, 9, 10, 11], max_tokens=4))
    plan = step(sched, runner)
    assert [s.request_id for s in plan.seqs] == ["second"], "the decode rode along"
    plan = step(sched, runner)
    assert sorted(s.request_id for s in plan.seqs) == ["first", "second"]
    run_to_end(sched, runner)
    assert first.output_token_ids == reference_output([5, 6, 7], 8)


def test_mixed_batches_carry_the_decodes_with_the_prompt():
    sched = make_scheduler()  # the scheduler's own default: mixed
    runner = FakeRunner(sched)
    sched.add_request(make_request("first", [5, 6, 7], max_tokens=8))
    step(sched, runner)
    sched.add_request(make_request("second", [8, 9, 10, 11], max_tokens=4))
    assert sorted(s.request_id for s in step(sched, runner).seqs) == ["first", "second"]


def test_a_chunked_prompt_runs_its_chunks_first():
    sched = make_scheduler(budget=8, mixed_batches=False)
    runner = FakeRunner(sched)
    short = decoding_then_a_long_prompt(sched, runner)
    chunks = []
    while sched.requests["long"].num_computed_tokens < 40:
        plan = step(sched, runner)
        assert [s.request_id for s in plan.seqs] == ["long"]
        chunks.append(len(plan.seqs[0].token_ids))
    assert chunks == [8] * 5  # the whole budget each step
    assert kinds(step(sched, runner)) == {"decode"}
    run_to_end(sched, runner)
    assert short.output_token_ids == reference_output([5, 6, 7], 20)


def test_decodes_run_when_no_waiting_request_can_join():
    # A full running set (max_num_seqs) leaves no prompt work: the decodes run.
    sched = make_scheduler(max_num_seqs=1, mixed_batches=False)
    runner = FakeRunner(sched)
    sched.add_request(make_request("first", [5, 6, 7], max_tokens=4))
    step(sched, runner)
    sched.add_request(make_request("second", [8, 9], max_tokens=4))
    plan = step(sched, runner)
    assert [s.request_id for s in plan.seqs] == ["first"] and kinds(plan) == {"decode"}
    # Too few free blocks for a waiting request's prompt: the same.
    sched = make_scheduler(num_blocks=6, block_size=4, mixed_batches=False)
    runner = FakeRunner(sched)
    sched.add_request(make_request("first", range(3, 19), max_tokens=6))  # 4 blocks + 1
    step(sched, runner)
    sched.add_request(make_request("big", range(20, 32), max_tokens=2))  # needs 3 blocks
    plan = step(sched, runner)
    assert [s.request_id for s in plan.seqs] == ["first"], "a step with nothing planned"
    plans = run_to_end(sched, runner)
    assert all(plan.seqs for plan in plans)


@pytest.mark.parametrize("mixed", [False, True])
def test_every_request_gets_the_same_tokens_either_way(mixed):
    sched = make_scheduler(budget=16, num_blocks=24, mixed_batches=mixed)
    runner = FakeRunner(sched)
    reqs = [make_request(f"r{i}", range(3 + i, 13 + 3 * i), max_tokens=6 + i) for i in range(6)]
    for i, request in enumerate(reqs):  # arrivals spread over the steps
        sched.add_request(request)
        step(sched, runner)
        if i % 2:
            step(sched, runner)
    run_to_end(sched, runner)
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.params.max_tokens)


def test_the_platform_decides_unless_the_arguments_say():
    plugins = get_plugins()
    assert mixed_batches(EngineArgs(device="cpu"), plugins) is False
    assert mixed_batches(EngineArgs(device="cpu", enable_mixed_batches=True), plugins) is True


def test_the_engine_passes_the_choice_to_its_scheduler(tiny_llama):
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", enable_mixed_batches=True)
    assert llm.engine.scheduler.config.mixed_batches is True
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    assert llm.engine.scheduler.config.mixed_batches is False
