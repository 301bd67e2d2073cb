"""Bad requests against a real ``tessellm serve``: each is a 400 in OpenAI's shape and the
server keeps serving; a failure no request is to blame for (a worker died) fails the
in-flight requests and ends the server with status 1, so that a supervisor restarts it."""

from __future__ import annotations

import sys

import httpx
import openai
import pytest

POISON_SEED = 666  # the dying server's sampler "loses its worker" for this seed


@pytest.fixture(scope="module")
def client(tiny_server):
    with openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
        yield c


def assert_still_serving(client, http) -> None:
    assert http.get("/health").status_code == 200
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="hi", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens


ISSUE_REQUESTS = [
    {"prompt": "hi", "max_tokens": 4, "top_k": 10**20, "temperature": 1},
    {"prompt": "hi", "max_tokens": 4, "top_k": 100_000, "temperature": 1},
    {"prompt": "hi", "stop_token_ids": [1_000_000_000], "min_tokens": 2},
    {"prompt": "hi", "stop_token_ids": [10**20], "min_tokens": 2},
    {"prompt": "hi", "logit_bias": {"5": 1.0}, "seed": 10**20},
]


@pytest.mark.slow
@pytest.mark.parametrize("body", ISSUE_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
def test_the_issue_requests_are_400s_and_the_server_keeps_serving(client, http, body, stream):
    extra = {k: v for k, v in body.items() if k != "prompt"}
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as caught:
        # All through extra_body: the SDK would refuse a vLLM field (top_k) as an argument.
        client.completions.create(
            model=model, prompt=body["prompt"], stream=stream, extra_body=extra
        )
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error"
    assert_still_serving(client, http)


@pytest.mark.slow
@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "hi", "temperature": Infinity}',
        b'{"prompt": "hi", "top_p": NaN}',
        b'{"prompt": "hi", "presence_penalty": -1e999}',
        b'{"prompt": "hi", "stream": "yes"}',
        b'{"prompt": "hi", "echo": 1}',
        b'{"prompt": [[false]]}',
        b'{"prompt": [1, "2"]}',
        b'{"prompt": "hi", "max_tokens": 4.5}',
        b'{"prompt": [1, 2.5]}',
    ],
)
def test_non_finite_numbers_and_loose_types_are_400s(client, http, raw):
    response = http.post(
        "/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert_still_serving(client, http)


@pytest.mark.slow
def test_an_integral_float_is_an_integer_as_json_schema_says(http):
    body = {"prompt": [1, 2.0], "max_tokens": 3.0, "n": 1.0, "temperature": 0}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }


@pytest.mark.slow
def test_strict_chat_fields_are_400s(http):
    user = [{"role": "user", "content": "A"}]
    for extra in ({"stream": "yes"}, {"logprobs": 1}, {"stream_options": {"include_usage": 1}}):
        response = http.post("/v1/chat/completions", json={"messages": user, **extra})
        assert response.status_code == 400, (extra, response.text)


# A server whose sampler fails as a dead worker does, for a request with POISON_SEED.
DYING_SERVER = f"""
from tessellm.engine.sampler import Sampler
from tessellm.errors import WorkerError
real = Sampler.sample

def sample(self, logits, seqs):
    if any(s.params.seed == {POISON_SEED} for s in seqs):
        raise WorkerError("worker rank 1 (pid 4242) exited with code -9")
    return real(self, logits, seqs)

Sampler.sample = sample
from tessellm.cli.app import main
main()
"""


@pytest.mark.slow
def test_a_dead_engine_fails_in_flight_requests_and_the_server_exits_non_zero(
    tiny_llama, tmp_path, monkeypatch
):
    import server_harness

    monkeypatch.setattr(
        server_harness, "cli_command", lambda *args: [sys.executable, "-c", DYING_SERVER, *args]
    )
    server = server_harness.start_server(tiny_llama, tmp_path)
    try:
        # Long enough to be running still when the next request kills the engine.
        body = {"prompt": "A", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=server.url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            killer = http.post("/v1/completions", json={"prompt": "A", "seed": POISON_SEED})
            rest = [line for line in lines if line.startswith("data: ")]
        assert killer.status_code == 503, killer.text
        assert "exited with code -9" in killer.json()["error"]["message"]
        assert rest[-1] == "data: [DONE]"
        assert any('"error"' in line and "the engine stopped" in line for line in rest)
        assert server.process.wait(30) == 1
        assert "the engine stopped" in server.log()
    finally:
        server.stop()
