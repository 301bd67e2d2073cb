"""Bad input gets OpenAI-shaped 4xx errors, never a 500, and never disturbs other requests."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "A"}]
LONG_PROMPT = "A " * 600  # the tiny model's context is 512 tokens

# (route, body, param the error names or None when any)
INVALID = [
    (COMPLETIONS, {"prompt": "A", "max_tokens": "many"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "A", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "A", "temperature": -1}, "temperature"),
    (COMPLETIONS, {"prompt": "A", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "A", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "A", "presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {"prompt": "A", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "A", "stop": [""]}, None),
    (COMPLETIONS, {"prompt": "A", "stop": ["x"] * 17}, "stop"),
    (COMPLETIONS, {"prompt": "A", "logit_bias": {"nope": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "A", "logit_bias": {"99999": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "A", "suffix": "B"}, "suffix"),
    (COMPLETIONS, {"prompt": ""}, None),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [5, -1]}, None),
    (COMPLETIONS, {"prompt": [5, 10**6]}, None),
    (COMPLETIONS, {"prompt": {"text": "A"}}, "prompt"),
    (COMPLETIONS, {"prompt": LONG_PROMPT}, "prompt"),
    (COMPLETIONS, {"prompt": "A", "max_tokens": 100000}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 5}, "prompt"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "A"}]}, "messages"),
    (CHAT, {"messages": [{"content": "A"}]}, "messages"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    (CHAT, {"messages": USER, "max_completion_tokens": 100000}, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": "yes please"}, "logprobs"),
    (CHAT, {"messages": USER, "stream": "sometimes"}, "stream"),
    (CHAT, {"messages": USER, "seed": -3}, "seed"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": "x"}}, "stream_options"),
]


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("route", "body", "param"), INVALID)
def test_invalid_field_is_a_400(http, route, body, param):
    for stream in (False, True):
        if "stream" in body and stream:
            continue
        payload = {**body, "stream": True} if stream else body
        error = assert_openai_error(http.post(route, json=payload), 400)
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param


def test_errors_are_counted_by_route_and_status(http, tiny_server):
    assert http.post(CHAT, json={"messages": []}).status_code == 400
    metrics = tiny_server.metrics()
    assert metrics['tessellm:http_requests_total{route="/v1/chat/completions",status="400"}'] >= 1


def test_unknown_model_is_a_404(http):
    for route, body in ((COMPLETIONS, {"prompt": "A"}), (CHAT, {"messages": USER})):
        error = assert_openai_error(http.post(route, json={**body, "model": "gpt-9"}), 404)
        assert error["param"] == "model" and error["code"] == "model_not_found"


def test_unknown_route_is_an_openai_404(http):
    assert_openai_error(http.get("/v1/engines"), 404)


def test_openapi_schema_is_valid(http):
    from openapi_spec_validator import validate

    spec = http.get("/openapi.json").json()
    validate(spec)
    assert {"/v1/models", COMPLETIONS, CHAT, "/health", "/metrics", "/version"} <= set(
        spec["paths"]
    )


MALFORMED_BODIES = [
    b"{not json",
    b"",
    b"null",
    b"[]",
    b'"text"',
    b"{}",
    b'{"prompt": 5, "messages": 5, "n": "x", "max_tokens": 1e300}',
    b'{"prompt": "A", "messages": [{"role": "user"}], "temperature": NaN}',
    b"\xff\xfe\x00garbage",
]


def test_every_route_answers_malformed_bodies_without_a_500(http):
    spec = http.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        if path in ("/sleep", "/wake_up"):  # take no body; they put this shared server to
            continue  # sleep and back (tests/test_sleep_wake.py drives them)
        for method in operations:
            for body in MALFORMED_BODIES:
                response = http.request(
                    method.upper(), path, content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code < 500, (method, path, body, response.text)
                if method == "post":
                    assert_openai_error(response, 400)


def test_bad_requests_do_not_disturb_a_running_stream(http, tiny_server):
    body = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 40, "ignore_eos": True}
    expected = http.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    streamed: list[str] = []

    def consume():
        with httpx.stream(
            "POST", tiny_server.url + COMPLETIONS, json={**body, "stream": True}
        ) as r:
            streamed.extend(r.iter_lines())

    thread = threading.Thread(target=consume)
    thread.start()
    for route, bad, _ in INVALID[:12]:
        assert http.post(route, json=bad).status_code == 400
    thread.join(60)
    events = [line[len("data: ") :] for line in streamed if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == expected
    assert http.get("/health").status_code == 200


def test_a_wrong_method_is_a_405_that_names_the_allowed_ones(http):
    response = http.get(COMPLETIONS)
    error = assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST", response.headers
    assert error["message"] == "Method Not Allowed"
    assert http.delete("/health").headers["allow"] == "GET"


def test_bad_json_says_where_and_why(http):
    body = b'{"prompt": "A",\n  "max_tokens": }'
    response = http.post(COMPLETIONS, content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["message"] == "invalid JSON at line 2 column 17: Expecting value"
    assert error["param"] is None and error["type"] == "invalid_request_error"


def test_metrics_is_declared_as_text(http):
    spec = http.get("/openapi.json").json()
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")


def test_docs_and_schema_hits_are_counted_by_route(http, tiny_server):
    for path in ("/docs", "/openapi.json", "/no/such/route"):
        http.get(path)
    metrics = tiny_server.metrics()
    for route, status in (("/docs", 200), ("/openapi.json", 200), ("unmatched", 404)):
        assert metrics[f'tessellm:http_requests_total{{route="{route}",status="{status}"}}'] >= 1
