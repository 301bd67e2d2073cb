"""A server with an API key and a served name; SIGTERM lets an in-flight stream finish."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import openai
import pytest
from server_harness import start_server

pytestmark = pytest.mark.slow

KEY = "sk-test-secret"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def keyed_server(tiny_llama, tmp_path_factory):
    server = start_server(
        tiny_llama,
        tmp_path_factory.mktemp("keyed-server"),
        "--api-key",
        KEY,
        "--served-model-name",
        NAME,
        "--max-num-seqs",
        "4",
    )
    yield server
    server.stop()


def test_v1_routes_need_the_key(keyed_server):
    url = keyed_server.url
    body = {"model": NAME, "prompt": "A", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for response in (
            httpx.get(url + "/v1/models", headers=headers),
            httpx.post(url + "/v1/completions", json=body, headers=headers),
            httpx.post(url + "/v1/chat/completions", json={"messages": []}, headers=headers),
        ):
            assert response.status_code == 401, response.text
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and set(error) >= {"message", "type"}
    # The key is checked before the body is read: no key, a broken body, still a 401.
    for body in (b"{not json", b'{"prompt": 5}'):
        response = httpx.post(
            url + "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/no-such-route").status_code == 401
    for open_route in ("/health", "/version", "/metrics", "/docs"):
        assert httpx.get(url + open_route).status_code == 200


def test_the_right_key_and_served_name_work(keyed_server, tiny_llama):
    with openai.OpenAI(base_url=keyed_server.base_url, api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == [NAME]
        reply = client.completions.create(model=NAME, prompt="A", max_tokens=3)
        assert reply.model == NAME and reply.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=str(tiny_llama), prompt="A", max_tokens=3)
    bad_key = openai.OpenAI(base_url=keyed_server.base_url, api_key="bad", max_retries=0)
    with bad_key, pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_version_endpoint(keyed_server):
    from importlib.metadata import version

    assert httpx.get(keyed_server.url + "/version").json() == {"version": version("tessellm")}


def test_sigterm_lets_the_in_flight_stream_finish(keyed_server):
    body = {
        "model": NAME,
        "prompt": "The quick brown fox",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    started = threading.Event()
    lines: list[str] = []

    def consume():
        url = keyed_server.url + "/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(30)
    keyed_server.process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert keyed_server.process.wait(60) == 0, keyed_server.log()
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.TransportError):
        httpx.get(keyed_server.url + "/health", timeout=2)
