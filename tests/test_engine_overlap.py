"""The overlapped step loop (the next step launched before this step's outputs are built)
gives the same outputs as the serial one: greedy and seeded sampling, n > 1, stop strings
found a step late, stop token ids, EOS, logprobs, a small KV cache that forces preemption,
and an abort while a step is in flight. On the CPU the launch runs the model at once, but
the engine's order of work is the overlapped one, which is what these tests check."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

PROMPTS = [[5, 9, 13, 17], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [7] * 20, [100, 50, 25]]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=8)


def run(llm: LLM, overlap: bool, prompts, params) -> list:
    llm.engine.overlap_steps = overlap
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        # A step launched with requests that a stop string then finished may be left in
        # flight: it yields nothing (their extra tokens are dropped).
        while llm.engine.has_unfinished_requests():
            assert llm.engine.step() == []
    finally:
        llm.engine.overlap_steps = False
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
        run(llm, True, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    finally:
        del engine.output_processor.process
    # Every step but the last two (nothing left to launch) processed with one in flight.
    assert in_flight[:-2] and all(in_flight[:-2]) and not in_flight[-1]


def test_greedy_and_seeded_sampling_equal_the_serial_loop(llm):
    params = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, n=3, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=9),  # may stop at EOS
    ]
    for p in params:
        assert run(llm, True, PROMPTS, p) == run(llm, False, PROMPTS, p)


def test_stop_strings_found_a_step_late_equal_the_serial_loop(llm):
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
        serial = run(llm, False, PROMPTS, p)
        assert run(llm, True, PROMPTS, p) == serial
    assert serial[0][0][2] == "stop"  # the first prompt did stop on its string


def test_stop_token_ids_equal_the_serial_loop(llm):
    free = run(llm, False, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8))
    stop_id = free[0][0][0][3]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_id])
    overlapped = run(llm, True, PROMPTS, params)
    assert overlapped == run(llm, False, PROMPTS, params)
    assert overlapped[0][0][2:4] == ("stop", stop_id)


def test_preemption_under_a_small_cache_equals_the_serial_loop(tiny_llama):
    small = LLM(
        model=str(tiny_llama),
        dtype="float32",
        device="cpu",
        block_size=4,
        num_gpu_blocks_override=12,
    )
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    overlapped = run(small, True, PROMPTS, params)
    assert small.engine.stats()["num_preemptions"] > 0
    assert overlapped == run(small, False, PROMPTS, params)


def test_abort_while_a_step_is_in_flight(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    reference = run(llm, False, PROMPTS[:2], params)
    engine.overlap_steps = True
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
        engine.overlap_steps = False
    assert finished["keep"].outputs[0].token_ids == reference[0][0][0]
    assert len(aborted[0].outputs[0].token_ids) == 3
    assert engine.stats()["num_running"] == 0 and engine.kv_cache_manager.usage() == 0.0
