"""The server's engine thread is the step thread the CPU platform binds to a core
(``TESSELLM_CPU_OMP_THREADS_BIND``, tessellm_cpu/thread_binding.py), through the runner's
``Platform.enter_step_thread``; what it generates does not change."""

from __future__ import annotations

import asyncio
import os

from tessellm.config import EngineArgs
from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.engine.llm_engine import LLMEngine
from tessellm.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


async def generate_on_engine_thread(engine: AsyncLLMEngine, prompt: list[int]):
    engine.start()
    try:
        stream = engine.new_stream()
        await stream.add("r0", prompt, GREEDY)
        final = None
        while not stream.finished:
            final = (await stream.next_outputs())[-1]
        return final.outputs[0].token_ids, os.sched_getaffinity(engine._thread.native_id)
    finally:
        await engine.shutdown()


def test_the_engine_thread_is_bound_and_generates_the_same(tiny_llama, monkeypatch):
    allowed = os.sched_getaffinity(0)
    cpus = sorted(allowed, reverse=True)  # room for a worker, whatever the thread count
    args = EngineArgs(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=4)
    prompt = [1, 5, 9, 13, 17]
    monkeypatch.setenv("TESSELLM_CPU_OMP_THREADS_BIND", "nobind")
    unbound = LLMEngine(args)
    unbound.add_request("r0", prompt, GREEDY)
    expected = None
    while unbound.has_unfinished_requests():
        for out in unbound.step():
            expected = out.outputs[0].token_ids
    unbound.shutdown()

    monkeypatch.setenv("TESSELLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    engine = AsyncLLMEngine(LLMEngine(args))
    tokens, affinity = asyncio.run(generate_on_engine_thread(engine, prompt))
    assert affinity == {cpus[0]}
    assert tokens == expected and len(tokens) == 6
    assert os.sched_getaffinity(0) == allowed  # the main thread keeps its CPUs
