"""A grammar that does not compile in time fails its request with a client error (offline
and over the async front) while other requests run on; the compile itself finishes in
its worker and serves the next request with the same spec."""

from __future__ import annotations

import asyncio

import pytest
from test_so_engine_fake import GATE, _reset, choice, llm  # noqa: F401 - fixtures

from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.engine.step_recovery import FailedRequestOutput
from tessellm.errors import InvalidRequestError
from tessellm.sampling_params import SamplingParams


def test_a_parked_request_fails_after_the_compile_timeout(llm, monkeypatch):  # noqa: F811
    engine = llm.engine
    monkeypatch.setattr(engine.structured, "compile_timeout_s", 0.2)
    GATE.open.clear()
    engine.add_request("slow", "Hello", choice(["up", "down"], temperature=0))
    engine.add_request("free", "The capital of France is", SamplingParams(max_tokens=30))
    finished = {}
    while "slow" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert isinstance(finished["slow"], FailedRequestOutput)
    assert isinstance(finished["slow"].error, InvalidRequestError)
    assert "did not compile within 0.2 s" in str(finished["slow"].error)
    GATE.open.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert len(finished["free"].outputs[0].token_ids) == 30
    # The compile finished in its worker and is cached for the next request.
    assert llm.generate("Hello", choice(["up", "down"], temperature=0))[0].outputs[0].text in (
        "up",
        "down",
    )


def test_the_async_front_answers_a_slow_compile_with_a_client_error(llm, monkeypatch):  # noqa: F811
    monkeypatch.setattr(llm.engine.structured, "compile_timeout_s", 0.2)
    GATE.open.clear()
    front = AsyncLLMEngine(llm.engine)

    async def main() -> None:
        with pytest.raises(InvalidRequestError, match="did not compile within"):
            await front.prepare_structured(choice(["left", "right"]))

    try:
        asyncio.run(main())
    finally:
        GATE.open.set()
