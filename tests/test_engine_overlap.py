"""The overlapped step loop (the next step launched before this step's outputs are built)
and the schedule-ahead loop (launched before this step's tokens are known, placeholders
filled in from the sampled tokens) give the same outputs as the serial one: greedy and
seeded sampling, n > 1, stop strings found a step late, stop token ids, EOS, logprobs, a
small KV cache that forces preemption, prefix-cache hits on generated blocks, and an abort
while a step is in flight. On the CPU the launch runs the model at once, but the engine's
order of work is the overlapped one, which is what these tests check."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

PROMPTS = [[5, 9, 13, 17], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [7] * 20, [100, 50, 25]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=8)


MODES = ["overlap", "ahead"]


def set_mode(llm: LLM, mode: str) -> None:
    llm.engine.overlap_steps = mode in ("overlap", "ahead")
    llm.engine.schedule_ahead = mode == "ahead"


def run(llm: LLM, mode: str, prompts, params) -> list:
    set_mode(llm, mode)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        # A step launched with requests that a stop string then finished may be left in
        # flight: it yields nothing (their extra tokens are dropped).
        while llm.engine.has_unfinished_requests():
            assert llm.engine.step() == []
    finally:
        set_mode(llm, "serial")
    assert llm.engine.stats()["num_running"] == 0
    return [
        [
            (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
            for c in o.outputs
        ]
        for o in outs
    ]


def stop_string_for(llm: LLM, prompt: list[int], index: int) -> str:
    """A string from the middle of the prompt's free greedy continuation."""
    free = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    )
    words = free[0].outputs[0].text.split(" ")
    return words[index][-2:] + " " + words[index + 1][:1]


def test_overlap_is_used_and_processing_runs_with_a_step_in_flight(llm):
    engine = llm.engine
    process = engine.output_processor.process
    in_flight: list[bool] = []

    def spy(*args, **kwargs):
        in_flight.append(engine._in_flight is not None)
        return process(*args, **kwargs)

    engine.output_processor.process = spy
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        run(llm, "overlap", PROMPTS[:2], params)
    finally:
        del engine.output_processor.process
    # Every step but the last two (nothing left to launch) processed with one in flight.
    assert in_flight[:-2] and all(in_flight[:-2]) and not in_flight[-1]


@pytest.mark.parametrize("mode", MODES)
def test_greedy_and_seeded_sampling_equal_the_serial_loop(llm, mode):
    params = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, n=3, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=9),  # may stop at EOS
    ]
    for p in params:
        assert run(llm, mode, PROMPTS, p) == run(llm, "serial", PROMPTS, p)
    # Requests that read their own history (penalties, min_tokens) among the others: the
    # steps they sample in are not scheduled ahead; the rest of the run is.
    mixed = [
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, min_tokens=4),
        SamplingParams(temperature=0.7, seed=1, max_tokens=10, presence_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    ]
    assert run(llm, mode, PROMPTS, mixed) == run(llm, "serial", PROMPTS, mixed)


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings_found_a_step_late_equal_the_serial_loop(llm, mode):
    prompt = PROMPTS[0]
    stop = stop_string_for(llm, prompt, 2)
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
        SamplingParams(
            temperature=0.0,
            max_tokens=12,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=12, stop=[stop, " w1"]),
    ]
    for p in params:
        serial = run(llm, "serial", PROMPTS, p)
        assert run(llm, mode, PROMPTS, p) == serial
    assert serial[0][0][2] == "stop"  # the first prompt did stop on its string


@pytest.mark.parametrize("mode", MODES)
def test_stop_token_ids_equal_the_serial_loop(llm, mode):
    free = run(llm, "serial", PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8))
    stop_id = free[0][0][0][3]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_id])
    overlapped = run(llm, mode, PROMPTS, params)
    assert overlapped == run(llm, "serial", PROMPTS, params)
    assert overlapped[0][0][2:4] == ("stop", stop_id)


@pytest.mark.parametrize("mode", MODES)
def test_preemption_under_a_small_cache_equals_the_serial_loop(tiny_llama, mode):
    small = LLM(
        model=str(tiny_llama),
        dtype="float32",
        device="cpu",
        block_size=4,
        num_gpu_blocks_override=12,
    )
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    overlapped = run(small, mode, PROMPTS, params)
    assert small.engine.stats()["num_preemptions"] > 0
    assert overlapped == run(small, "serial", PROMPTS, params)


@pytest.mark.parametrize("mode", MODES)
def test_abort_while_a_step_is_in_flight(llm, mode):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    reference = run(llm, "serial", PROMPTS[:2], params)
    set_mode(llm, mode)
    try:
        engine.add_request("keep", PROMPTS[0], params)
        engine.add_request("drop", PROMPTS[1], params)
        finished = {}
        for _ in range(3):
            for out in engine.step():
                finished[out.request_id] = out
        assert engine._in_flight is not None  # "drop" is in the launched step
        aborted = engine.abort_request("drop")
        assert aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id == "keep"
                finished[out.request_id] = out
    finally:
        set_mode(llm, "serial")
    assert finished["keep"].outputs[0].token_ids == reference[0][0][0]
    assert len(aborted[0].outputs[0].token_ids) == 3
    assert engine.stats()["num_running"] == 0 and engine.kv_cache_manager.usage() == 0.0


def test_schedule_ahead_feeds_placeholders_and_publishes_generated_blocks(tiny_llama):
    """Scheduled ahead, the plans carry placeholders for the running step's tokens, and
    the blocks those tokens complete are published once the tokens are known: a second
    turn over the first turn's text hits them, as in the serial loop."""
    from tessellm.interfaces.engine import PLACEHOLDER_TOKEN

    def two_turns(mode: str) -> tuple[list, int, bool]:
        llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", block_size=4)
        launch = llm.engine.executor.launch
        saw_placeholder = []

        def spy(plan, previous=None):
            saw_placeholder.extend(PLACEHOLDER_TOKEN in s.token_ids for s in plan.seqs)
            return launch(plan, previous)

        llm.engine.executor.launch = spy
        params = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
        first = run(llm, mode, PROMPTS[:1], params)
        hits = llm.engine.stats()["prefix_cache_hit_tokens"]
        follow_up = PROMPTS[0] + first[0][0][0] + [11, 12]
        second = run(llm, mode, [follow_up], params)
        hit = llm.engine.stats()["prefix_cache_hit_tokens"] - hits
        return [first, second], hit, any(saw_placeholder)

    serial, serial_hit, _ = two_turns("serial")
    ahead, ahead_hit, placeholders = two_turns("ahead")
    assert placeholders
    assert ahead == serial
    # 4 prompt + 13 generated + 2 tokens: the first 16 (4 blocks) were cached by turn one.
    assert ahead_hit == serial_hit == 16


def test_schedule_ahead_keeps_the_kv_consistent_under_preemption_and_stops():
    """At the scheduler level, with test_scheduler's fake runner (which checks that every
    attended position holds its own prefix's KV): random prompts sharing prefixes, stop
    token ids, a pool small enough to preempt, both policies. Scheduled ahead (steps run
    in launch order, placeholders resolved from the step before), the outputs equal the
    serial loop's and every block comes back."""
    import random

    from test_scheduler import FakeRunner, make_request, make_scheduler

    from tessellm.interfaces.engine import PLACEHOLDER_TOKEN

    class AheadRunner(FakeRunner):
        """Resolves placeholders as the device does: from the previous step's tokens."""

        def execute_after(self, plan, previous: dict[str, int]):
            requests = self.scheduler.requests
            saved = {}
            for seq in plan.seqs:
                outputs = requests[seq.request_id].output_token_ids
                if outputs and outputs[-1] == PLACEHOLDER_TOKEN:
                    saved[seq.request_id] = outputs
                    outputs[-1] = previous[seq.request_id]
            for seq in plan.seqs:
                if seq.token_ids[-1] == PLACEHOLDER_TOKEN:
                    seq.token_ids[-1] = previous[seq.request_id]
                    counts["placeholders"] += 1
            try:
                return self.execute(plan)
            finally:
                for outputs in saved.values():
                    outputs[-1] = PLACEHOLDER_TOKEN

    def sampled(plan, result) -> dict[str, int]:
        ids = [s.request_id for s in plan.seqs if s.sample]
        return dict(zip(ids, result.sampled_token_ids, strict=True))

    def run(ahead: bool, seed: int, policy: str) -> dict[str, list[int]]:
        rng = random.Random(seed)
        sched = make_scheduler(num_blocks=14, block_size=4, budget=24, policy=policy)
        runner = AheadRunner(sched)
        shared = [rng.randrange(3, 50) for _ in range(6)]
        requests = []
        for i in range(7):
            prompt = shared[: rng.randrange(7)] + [rng.randrange(3, 50) for _ in range(5)]
            requests.append(
                make_request(
                    f"r{i}",
                    prompt,
                    max_tokens=rng.randrange(3, 12),
                    priority=rng.randrange(3) if policy == "priority" else 0,
                    stop_token_ids=[rng.randrange(3, 50) for _ in range(3)],
                )
            )
            sched.add_request(requests[-1])
        in_flight = None
        for _ in range(500):
            if in_flight is None:
                if not sched.has_unfinished():
                    break
                plan = sched.schedule()
                result = runner.execute(plan)
            else:
                plan, result = in_flight
                in_flight = None
            if ahead:
                sched.advance(plan)
                if sched.has_unfinished():
                    nxt = sched.schedule()
                    if not nxt.empty:
                        in_flight = (nxt, runner.execute_after(nxt, sampled(plan, result)))
                sched.fill(plan, result)
            else:
                sched.update(plan, result)
        assert in_flight is None and not sched.has_unfinished()
        assert sched.kv.num_free_blocks == sched.kv.num_blocks
        counts["preemptions"] += sched.counters.num_preemptions
        counts["stops"] += sum(r.stop_reason is not None for r in requests)
        return {r.request_id: r.output_token_ids for r in requests}

    counts = {"preemptions": 0, "stops": 0, "placeholders": 0}
    for seed in range(12):
        for policy in ("fcfs", "priority"):
            serial = run(False, seed, policy)
            ahead = run(True, seed, policy)
            assert ahead == serial
            assert all(PLACEHOLDER_TOKEN not in out for out in ahead.values())
    assert counts["preemptions"] > 0 and counts["stops"] > 0 and counts["placeholders"] > 0
