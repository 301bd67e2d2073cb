"""Many clients at once: one engine loop batches them, and clients that leave free their blocks."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from conftest import TEST_PROMPTS

pytestmark = pytest.mark.slow

CONCURRENT = 32
TOKENS = 24


def increase(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[f"tessellm:{name}"] - before[f"tessellm:{name}"]


def wait_until_idle(server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        idle = (
            metrics["tessellm:num_requests_running"] == 0
            and metrics["tessellm:num_requests_waiting"] == 0
            and metrics["tessellm:kv_cache_usage_perc"] == 0
        )
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def test_concurrent_streams_complete_and_share_steps(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    prompts = [TEST_PROMPTS[i % len(TEST_PROMPTS)] for i in range(CONCURRENT)]
    expected = {
        p: client.completions.create(
            model=model, prompt=p, temperature=0, max_tokens=TOKENS, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in set(prompts)
    }
    before = wait_until_idle(tiny_server)

    async def one(aclient, prompt):
        stream = await aclient.completions.create(
            model=model,
            prompt=prompt,
            temperature=0,
            max_tokens=TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    async def main():
        limits = httpx.Limits(max_connections=CONCURRENT)
        async with openai.AsyncOpenAI(
            base_url=tiny_server.base_url,
            api_key="x",
            http_client=openai.DefaultAsyncHttpxClient(limits=limits),
        ) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(main())
    assert [text for text, _ in results] == [expected[p] for p in prompts]
    assert all(reason == "length" for _, reason in results)

    after = wait_until_idle(tiny_server)
    generated = increase(before, after, "generation_tokens_total")
    steps = increase(before, after, "engine_steps_total")
    assert generated == CONCURRENT * TOKENS
    # One request at a time would take a step per generated token; batched, the 32 streams
    # share steps, so far fewer are needed.
    assert steps <= generated / 4, (steps, generated)
    assert after["tessellm:batched_seqs_max"] >= CONCURRENT // 2
    assert after["tessellm:kv_cache_usage_perc"] == 0
    assert increase(before, after, "time_to_first_token_seconds_count") == CONCURRENT
    assert increase(before, after, "time_per_output_token_seconds_count") == CONCURRENT
    assert increase(before, after, 'request_success_total{finish_reason="length"}') == CONCURRENT
    ok = 'http_requests_total{route="/v1/completions",status="200"}'
    assert increase(before, after, ok) == CONCURRENT


def test_disconnected_clients_abort_and_free_their_blocks(tiny_server):
    long_body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    before = wait_until_idle(tiny_server)

    async def leave_mid_stream(client):
        body = {**long_body, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    return  # closes the connection mid-stream

    async def give_up_waiting(client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=long_body, timeout=0.5)

    async def chat_then_leave(client):
        body = {"messages": [{"role": "user", "content": "A"}], "stream": True, **long_body}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=30) as client:
            await asyncio.gather(
                *(leave_mid_stream(client) for _ in range(6)),
                *(give_up_waiting(client) for _ in range(4)),
                *(chat_then_leave(client) for _ in range(2)),
            )

    asyncio.run(main())
    after = wait_until_idle(tiny_server)
    assert after["tessellm:num_requests_running"] == 0
    assert after["tessellm:num_requests_waiting"] == 0
    assert after["tessellm:kv_cache_usage_perc"] == 0
    generated = increase(before, after, "generation_tokens_total")
    # Aborted, not run to the end: 12 requests of 400 tokens would generate 4800.
    assert generated < 12 * 400 / 2, generated
    assert httpx.get(tiny_server.url + "/health").status_code == 200
