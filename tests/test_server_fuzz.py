"""Schemathesis fuzzes the server's own OpenAPI schema, in-process, on a tiny model.

Every operation gets requests that the schema allows (positive) and, for the generation
routes, requests it forbids (negative). None may get a 5xx, nor a stream whose error event
is a server error; ``/health`` is 200 afterwards and a plain request still completes.

Most bodies the schema allows still break a rule it cannot state (a prompt plus
``max_tokens`` beyond the context, an unknown model name, ``suffix``), and a 400 ends them
before the engine sees their sampling fields. So positive bodies are first fitted to those
rules (``fit_to_server``): every sampling field keeps its generated value, token ids are
folded into the vocabulary, and the request runs through the engine. The run is bounded: a
few dozen examples per operation, each under a deadline, on a 64-token context.
"""

from __future__ import annotations

import json
import time
import zlib
from datetime import timedelta

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from starlette.testclient import TestClient

from tessellm.config import EngineArgs
from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.server.app import build_app

pytestmark = pytest.mark.slow

BASE_URL = "http://testserver"
VOCAB = 256  # the tiny Llama's
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 20}
GET_EXAMPLES = 5  # routes without parameters: little to vary
DEADLINE = timedelta(seconds=15)  # one request; generous for a busy 2-core machine


@pytest.fixture(scope="module")
def client(tiny_llama):
    args = EngineArgs(
        model=str(tiny_llama), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=32
    )
    engine = AsyncLLMEngine.from_engine_args(args)
    assert engine.engine.vocab_size == VOCAB
    app = build_app(engine, ["tiny"])
    # The context runs the app's lifespan: the engine thread serves this client's loop.
    with TestClient(app, base_url=BASE_URL, raise_server_exceptions=False) as test_client:
        yield test_client


def _token(value: int) -> int:
    return value % VOCAB


def _short(item: object) -> object:
    """A prompt item cut to a few tokens: text to 12 characters, token ids folded."""
    if isinstance(item, str):
        return item[:12] or "hi"
    if isinstance(item, (int, float)):  # 3.0 is an integer too, to JSON Schema
        return _token(int(item))
    return [_short(x) for x in item[:6]] if isinstance(item, list) else item


def fit_to_server(body: dict) -> dict:
    """A schema-valid body changed only where the server has a rule the schema cannot
    state, so that the request reaches the engine with its sampling fields as generated."""
    body = {k: v for k, v in body.items() if k not in ("model", "suffix", "best_of", "tools")}
    body.pop("response_format", None)
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), (int, float)):
            body[key] = 1 + int(body[key]) % 8  # prompt + completion within the context
    if isinstance(body.get("n"), (int, float)):
        body["n"] = 1 + (int(body["n"]) - 1) % 8  # up to 128 is allowed, but slow here
    if isinstance(body.get("min_tokens"), (int, float)):
        body["min_tokens"] = int(body["min_tokens"]) % 4
    if isinstance(body.get("top_k"), (int, float)) and body["top_k"] > VOCAB:
        body["top_k"] = int(body["top_k"]) % (VOCAB + 1)
    if isinstance(body.get("stop"), list):
        body["stop"] = [s for s in body["stop"] if s]  # an empty stop string is a 400
    if "prompt" in body:
        prompt = body["prompt"]
        body["prompt"] = _short(prompt[:2] if isinstance(prompt, list) and prompt else prompt)
    if isinstance(body.get("messages"), list):
        body["messages"] = [
            {**m, "content": _short(m["content"][:2])}
            if isinstance(m.get("content"), list)
            else {**m, "content": (m.get("content") or "")[:12]}
            for m in body["messages"][:2]
        ]
        for message in body["messages"]:
            if isinstance(message["content"], list):
                # Text parts shortened; image parts (a tiny text model refuses them: 400) kept.
                message["content"] = [
                    {**p, "text": p["text"][:12]}
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                    else p
                    for p in message["content"]
                ]
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    if body.get("stop_token_ids"):
        body["stop_token_ids"] = [_token(int(t)) for t in body["stop_token_ids"]]
    if body.get("logit_bias"):
        body["logit_bias"] = {
            str(_token(zlib.crc32(k.encode()))): v for k, v in body["logit_bias"].items()
        }
    return body


def send(client: TestClient, case: schemathesis.Case):
    kwargs = case.as_transport_kwargs(base_url=BASE_URL)
    kwargs.pop("cookies", None)  # none in this schema; httpx refuses per-request cookies
    headers = kwargs.pop("headers", {})
    headers.pop("Connection", None)
    return client.request(headers=headers, **kwargs)


def check(case: schemathesis.Case, response) -> None:
    where = f"{case.method} {case.path} {case.body!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                error = json.loads(line[len("data: ") :]).get("error")
                assert error is None or error["type"] != "server_error", f"{where} -> {line}"
    elif response.status_code >= 400 and case.method == "POST":
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def fuzz(client: TestClient, operation, mode: GenerationMode, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=DEADLINE,
        database=None,  # nothing written into the checkout
        derandomize=True,  # the same examples on every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body = fit_to_server(case.body)
        check(case, send(client, case))

    run()


def test_no_generated_request_gets_a_5xx(client):
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    # Sleep and wake change the whole server's state on purpose (a sleeping server answers
    # 503 by design); tests/test_sleep_wake.py drives them.
    operations = [op for op in operations if op.path not in ("/sleep", "/wake_up")]
    start = time.monotonic()
    for operation in operations:
        if operation.method.upper() == "POST":
            for mode, examples in EXAMPLES.items():
                fuzz(client, operation, mode, examples)
        else:
            fuzz(client, operation, GenerationMode.POSITIVE, GET_EXAMPLES)
    elapsed = time.monotonic() - start
    assert client.get("/health").status_code == 200
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    done = client.post("/v1/completions", json=body)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
    print(f"fuzzed {len(operations)} operations in {elapsed:.1f} s")
