"""``tessellm serve --data-parallel-size 2``: two engine replicas behind one endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from conftest import TEST_PROMPTS, live_descendants

from tessellm import LLM, SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 10
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def dp_server(tiny_llama, tmp_path_factory):
    from server_harness import start_server

    server = start_server(
        tiny_llama, tmp_path_factory.mktemp("dp-logs"), "--data-parallel-size", "2"
    )
    yield server
    server.stop()


def replica_metrics(server, name: str) -> dict[str, float]:
    prefix = f'tessellm:{name}{{replica="'
    return {
        key[len(prefix) : -2]: value
        for key, value in server.metrics().items()
        if key.startswith(prefix)
    }


def test_concurrent_requests_are_answered_correctly_by_both_replicas(dp_server, tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    expected = [o.outputs[0].text for o in llm.generate(TEST_PROMPTS, params)]
    expected_chat = llm.chat(MESSAGES, params)[0].outputs[0].text
    llm.engine.shutdown()

    async def ask(client: httpx.AsyncClient, prompt: str) -> str:
        body = {
            "model": str(tiny_llama),
            "prompt": prompt,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = await client.post(dp_server.base_url + "/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    async def stream_chat(client: httpx.AsyncClient) -> str:
        body = {
            "model": str(tiny_llama),
            "messages": MESSAGES,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text = ""
        async with client.stream("POST", dp_server.base_url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[len("data: ") :])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        return text

    async def ask_all() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            asks = [ask(client, p) for p in TEST_PROMPTS]
            return await asyncio.gather(stream_chat(client), *asks)

    chat_text, *texts = asyncio.run(ask_all())
    assert texts == expected
    assert chat_text == expected_chat

    requests = len(TEST_PROMPTS) + 1
    routed = replica_metrics(dp_server, "replica_requests_routed_total")
    assert set(routed) == {"0", "1"}
    assert all(count >= 1 for count in routed.values())
    assert sum(routed.values()) == requests
    generated = replica_metrics(dp_server, "replica_generation_tokens_total")
    total = requests * NEW_TOKENS
    assert sum(generated.values()) == total
    assert dp_server.metrics()["tessellm:generation_tokens_total"] == total


def test_structured_outputs_through_the_front(dp_server, tiny_llama):
    from transformers import AutoTokenizer

    words = sorted(w for w in AutoTokenizer.from_pretrained(tiny_llama).get_vocab() if w.isalpha())
    choices = words[:2]
    body = {"model": str(tiny_llama), "prompt": "The quick brown fox", "max_tokens": 8}
    with httpx.Client(timeout=120) as client:
        ok = client.post(
            dp_server.base_url + "/completions",
            json={**body, "structured_outputs": {"choice": choices}},
        )
        assert ok.status_code == 200, ok.text
        # The word-level test tokenizer decodes a word with a leading space.
        assert ok.json()["choices"][0]["text"].strip() in choices
        bad = client.post(dp_server.base_url + "/completions", json={**body, "guided_regex": "("})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "guided_regex"


def test_a_dead_replica_stops_the_server_and_leaves_no_process(dp_server):
    # Runs last: it takes the shared server down.
    children = live_descendants(dp_server.process.pid)
    assert len(children) >= 2
    os.kill(min(children), signal.SIGKILL)  # the first replica started
    # A dead engine cannot serve again: the server exits non-zero, for a supervisor.
    assert dp_server.process.wait(30) == 1
    assert "data-parallel replica" in dp_server.log()
    assert "killed by SIGKILL" in dp_server.log()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in children):
        assert time.monotonic() < deadline, "replica processes outlived the server"
        time.sleep(0.1)
