"""``tessellm run-batch``: OpenAI Batch API JSONL in, one result line per request out, run
through the server's own routes; bad lines get error records and the rest still run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_PROMPTS

from tessellm import LLM, SamplingParams
from tessellm.cli.run_batch import BatchLine, parse_line

_script = Path(sys.executable).parent / "tessellm"
TESSELLM = [str(_script)] if _script.exists() else [sys.executable, "-m", "tessellm.cli.app"]
NEW_TOKENS = 6
CHATS = [
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
]


def request(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def completion(custom_id: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return request(custom_id, "/v1/completions", body)


def chat(custom_id: str, messages: list[dict]) -> str:
    body = {"messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return request(custom_id, "/v1/chat/completions", body)


@pytest.fixture(scope="module")
def batch_run(tiny_llama, tmp_path_factory):
    """One run over completions, chats and bad lines mixed; (input lines, output records,
    the process)."""
    lines = [
        completion("cmpl-0", TEST_PROMPTS[0]),
        chat("chat-0", CHATS[0]),
        "{not json",
        completion("cmpl-1", TEST_PROMPTS[1]),
        request("bad-url", "/v1/embeddings", {"input": "x"}),
        "",  # blank lines are not requests
        request("bad-body", "/v1/completions", {"prompt": "x", "max_tokens": -3}),
        chat("chat-1", CHATS[1]),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}),
        request("wrong-model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}),
        completion("cmpl-2", TEST_PROMPTS[2]),
    ]
    folder = tmp_path_factory.mktemp("run-batch")
    source, target = folder / "in.jsonl", folder / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    # Two sequence slots: fewer requests in flight (4) than the file has, as with a big file.
    engine = ["--model", str(tiny_llama), "--dtype", "float32", "--device", "cpu"]
    engine += ["--max-num-seqs", "2"]
    done = subprocess.run(
        [*TESSELLM, "run-batch", "-i", str(source), "-o", str(target), *engine],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in target.read_text().splitlines()]
    return [line for line in lines if line], records, done


def test_one_record_per_request_in_input_order(batch_run):
    lines, records, done = batch_run
    assert len(records) == len(lines)
    ids = [r["custom_id"] for r in records]
    assert ids == [
        "cmpl-0", "chat-0", None, "cmpl-1", "bad-url", "bad-body", "chat-1", "get",
        "wrong-model", "cmpl-2",
    ]  # fmt: skip
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["id"].startswith("batch_req_") for r in records)
    assert f"{len(lines)}/{len(lines)}" in done.stderr  # the progress bar reached the end
    assert "5 succeeded, 5 failed" in done.stderr


def test_greedy_outputs_equal_llm_generate(batch_run, tiny_llama):
    _, records, _ = batch_run
    by_id = {r["custom_id"]: r for r in records}
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    texts = [o.outputs[0].text for o in llm.generate(TEST_PROMPTS[:3], params)]
    chats = [o.outputs[0].text for o in llm.chat(CHATS, params)]
    for i, text in enumerate(texts):
        response = by_id[f"cmpl-{i}"]["response"]
        assert response["status_code"] == 200
        assert response["request_id"] == response["body"]["id"]
        assert response["body"]["object"] == "text_completion"
        assert response["body"]["choices"][0]["text"] == text
        assert response["body"]["usage"]["completion_tokens"] == NEW_TOKENS
        assert by_id[f"cmpl-{i}"]["error"] is None
    for i, text in enumerate(chats):
        body = by_id[f"chat-{i}"]["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("custom_id", "status", "param", "line_error"),
    [
        (None, 400, None, "invalid_json"),
        ("bad-url", 400, "url", "invalid_url"),
        ("bad-body", 400, "max_tokens", None),
        ("get", 400, None, "invalid_method"),
        ("wrong-model", 404, "model", None),
    ],
)
def test_bad_lines_get_openai_error_records(batch_run, custom_id, status, param, line_error):
    _, records, _ = batch_run
    (rec,) = [r for r in records if r["custom_id"] == custom_id]
    assert rec["response"]["status_code"] == status
    error = rec["response"]["body"]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param
    if line_error is None:  # refused by the endpoint itself, as the server would
        assert rec["error"] is None
    else:  # never reached an endpoint: the record says why
        assert rec["error"]["code"] == line_error == error["code"]
        assert rec["error"]["message"] == error["message"]


def test_parse_line_cases():
    ok = parse_line(3, 4, completion("x", "Hi"))
    assert isinstance(ok, BatchLine) and ok.index == 3 and ok.url == "/v1/completions"
    assert json.loads(ok.body)["prompt"] == "Hi"
    assert "line 7 is not valid JSON" in parse_line(0, 7, "[1,")["error"]["message"]
    assert parse_line(0, 1, "[1, 2]")["error"]["code"] == "invalid_request"
    assert parse_line(0, 1, json.dumps({"url": "/v1/completions"}))["error"]["code"] == (
        "invalid_request"
    )  # no custom_id
    no_body = parse_line(0, 1, json.dumps({"custom_id": "a", "url": "/v1/completions"}))
    assert no_body["custom_id"] == "a" and no_body["response"]["body"]["error"]["param"] == "body"
    streamed = parse_line(0, 1, request("s", "/v1/completions", {"prompt": "x", "stream": True}))
    assert streamed["response"]["body"]["error"]["param"] == "stream"


def test_unreadable_input_is_a_user_error(tmp_path):
    done = subprocess.run(
        [*TESSELLM, "run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", "out.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "cannot read the input file" in done.stderr
    assert "Traceback" not in done.stderr
