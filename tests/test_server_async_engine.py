"""AsyncLLMEngine's failure paths, on a scripted stand-in for LLMEngine (no model needed)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tessellm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tessellm.errors import InvalidRequestError
from tessellm.outputs import CompletionOutput, RequestOutput
from tessellm.sampling_params import SamplingParams


class ScriptedEngine:
    """Each request yields one token per step until it has ``max_tokens``."""

    tokenizer = None
    max_model_len = 64

    def __init__(self, fail_on_step: int | None = None) -> None:
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_on_step = fail_on_step
        self.shut_down = False
        self.thread_ids: set[int] = set()

    def stats(self) -> dict[str, float]:
        return {"num_running": len(self.requests), "steps": self.steps}

    def add_request(self, request_id, prompt, params, priority=0):
        self.thread_ids.add(threading.get_ident())
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        self.requests[request_id] = ([], params)
        return request_id

    def abort_request(self, ids):
        for request_id in [ids] if isinstance(ids, str) else ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)
        return []

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.steps == self.fail_on_step:
            raise RuntimeError("kernel exploded")
        outputs = []
        for request_id, (tokens, params) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= params.max_tokens
            reason = "length" if done else None
            comp = CompletionOutput(0, " ".join(map(str, tokens)), tokens, finish_reason=reason)
            outputs.append(RequestOutput(request_id, None, [1], [comp], done))
            if done:
                del self.requests[request_id]
        return outputs

    def shutdown(self) -> None:
        self.shut_down = True


async def drain(stream) -> RequestOutput:
    last = None
    while not stream.finished:
        last = (await stream.next_outputs())[-1]
    return last


def test_requests_run_on_the_engine_thread_and_finish():
    engine = ScriptedEngine()

    async def main():
        runner = AsyncLLMEngine(engine)
        runner.start()
        streams = [runner.new_stream() for _ in range(3)]
        for i, stream in enumerate(streams):
            await stream.add(f"r{i}", [1, 2], SamplingParams(max_tokens=5))
        finals = await asyncio.gather(*(drain(s) for s in streams))
        with pytest.raises(InvalidRequestError):
            await runner.new_stream().add("bad", [], SamplingParams())
        await runner.shutdown()
        return finals

    finals = asyncio.run(main())
    assert [f.outputs[0].token_ids for f in finals] == [[0, 1, 2, 3, 4]] * 3
    assert engine.thread_ids and threading.get_ident() not in engine.thread_ids
    assert engine.shut_down


def test_abort_after_the_reader_is_cancelled_reaches_the_engine():
    engine = ScriptedEngine()

    async def main():
        runner = AsyncLLMEngine(engine)
        runner.start()
        stream = runner.new_stream()
        await stream.add("long", [1], SamplingParams(max_tokens=10**6))
        reader = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.05)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        stream.abort()
        await runner.call(lambda e: None)  # the abort is queued ahead of this command
        await runner.shutdown()

    asyncio.run(main())
    assert engine.aborted == ["long"] and not engine.requests


def test_a_failing_step_fails_waiting_requests_and_later_calls():
    engine = ScriptedEngine(fail_on_step=3)

    async def main():
        runner = AsyncLLMEngine(engine)
        runner.start()
        stream = runner.new_stream()
        await stream.add("r", [1], SamplingParams(max_tokens=100))
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            await drain(stream)
        assert not runner.is_running
        with pytest.raises(EngineDeadError):
            await runner.new_stream().add("later", [1], SamplingParams())

    asyncio.run(main())


def test_shutdown_ends_streams_still_running():
    engine = ScriptedEngine()

    async def main():
        runner = AsyncLLMEngine(engine)
        runner.start()
        stream = runner.new_stream()
        await stream.add("r", [1], SamplingParams(max_tokens=10**6))
        reader = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.02)
        await runner.shutdown()
        with pytest.raises(EngineDeadError, match="shutting down"):
            await reader

    asyncio.run(main())
    assert engine.shut_down


class GilHoldingEngine(ScriptedEngine):
    """Each step first holds the GIL for ~20 ms in one C call, as the CPU's compiled decode
    library does, and records when it started."""

    def __init__(self) -> None:
        super().__init__()
        self.step_started: list[float] = []

    def step(self) -> list[RequestOutput]:
        self.step_started.append(time.perf_counter())
        sum(range(1_500_000))  # one C call: no GIL switch inside it
        return super().step()


def test_each_steps_outputs_reach_the_stream_before_the_next_step():
    engine = GilHoldingEngine()
    received: list[float] = []

    async def main():
        runner = AsyncLLMEngine(engine)
        runner.start()
        stream = runner.new_stream()
        await stream.add("r0", [1], SamplingParams(max_tokens=6))
        while not stream.finished:
            await stream.next_outputs()
            received.append(time.perf_counter())
        await runner.shutdown()

    asyncio.run(main())
    assert len(received) == 6 and len(engine.step_started) == 6
    # Token k was with its reader before step k + 1 began (else it waited out that step).
    assert all(got < nxt for got, nxt in zip(received, engine.step_started[1:], strict=False))


class CountingTokenizer:
    """Encodes text to its words' lengths; remembers the threads that used it."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def encode(self, text: str) -> list[int]:
        self.threads.add(threading.get_ident())
        return [len(word) for word in text.split()]


def test_tokenizing_does_not_wait_for_the_step_in_flight():
    engine = ScriptedEngine()
    engine.tokenizer = CountingTokenizer()
    in_step, release = threading.Event(), threading.Event()
    plain_step = engine.step

    def slow_step():
        in_step.set()
        release.wait(10)  # a long forward pass
        return plain_step()

    engine.step = slow_step

    async def main():
        runner = AsyncLLMEngine(engine)
        runner.start()
        stream = runner.new_stream()
        await stream.add("busy", [1], SamplingParams(max_tokens=2))
        await asyncio.to_thread(in_step.wait, 10)
        start = time.perf_counter()
        ids, front = await runner.front_call(lambda f: (f.tokenize("one three"), f.tokenizer))
        waited = time.perf_counter() - start
        stepping = not release.is_set()
        release.set()
        await drain(stream)
        await runner.shutdown()
        return ids, front, waited, stepping

    ids, front, waited, stepping = asyncio.run(main())
    assert ids == [3, 5] and stepping and waited < 5
    # The routes' copy, used off the engine thread; the engine's own was not touched.
    assert front is not engine.tokenizer and not engine.tokenizer.threads
    assert front.threads and not front.threads & engine.thread_ids
