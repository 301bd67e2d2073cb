"""``tessellm chat`` driven through stdin, against a running server and on a local engine."""

from __future__ import annotations

import os
import subprocess

import openai
import pytest
from server_harness import cli_command, free_port

pytestmark = pytest.mark.slow

TRUNCATED_MARK = " [truncated: max tokens]"
TURNS = ["/help", "Hello", "The quick brown fox", "/reset", "Hello", "/exit", "never read"]
REPLY_TOKENS = 6


def run_chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        cli_command("chat", "--temperature", "0", "--max-tokens", str(REPLY_TOKENS), *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.fixture(scope="module")
def expected_transcript(tiny_server):
    """What the chat should print: each greedy reply, given the conversation so far."""
    with openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as client:
        model = client.models.list().data[0].id

        def reply(messages):
            out = client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_tokens=REPLY_TOKENS
            )
            return out.choices[0].message.content, out.choices[0].finish_reason

        first, first_end = reply([{"role": "user", "content": "Hello"}])
        second, second_end = reply(
            [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "The quick brown fox"},
            ]
        )
    assert first and second
    # A reply cut by --max-tokens is marked as such (the history keeps it unmarked).
    assert "length" in (first_end, second_end)
    first_shown = first + (TRUNCATED_MARK if first_end == "length" else "")
    second_shown = second + (TRUNCATED_MARK if second_end == "length" else "")
    return [first_shown, second_shown, "(conversation cleared)", first_shown]


def assert_transcript(stdout: str, expected: list[str]) -> None:
    lines = stdout.splitlines()
    # /help is answered by the chat itself (one line per command), not sent to the model.
    assert [line.split()[0] for line in lines[:3]] == ["/help", "/reset", "/exit"], stdout
    assert lines[3:] == expected


def test_chat_against_a_running_server(tiny_server, expected_transcript):
    result = run_chat("--url", tiny_server.url, stdin="\n".join(TURNS) + "\n")
    assert result.returncode == 0, result.stderr
    assert_transcript(result.stdout, expected_transcript)


def test_chat_on_a_local_engine(tiny_llama, expected_transcript):
    args = ("--model", str(tiny_llama), "--dtype", "float32", "--device", "cpu")
    result = run_chat(*args, stdin="\n".join(TURNS) + "\n")
    assert result.returncode == 0, result.stderr
    assert_transcript(result.stdout, expected_transcript)


def test_chat_reports_an_unreachable_server():
    result = run_chat("--url", f"http://127.0.0.1:{free_port()}", stdin="Hello\n")
    assert result.returncode == 1
    assert "Error: cannot reach" in result.stderr
