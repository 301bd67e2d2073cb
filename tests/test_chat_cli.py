"""``tessellm chat`` driven through stdin, against a running server and on a local engine."""

from __future__ import annotations

import os
import subprocess

import openai
import pytest
from server_harness import cli_command, free_port

pytestmark = pytest.mark.slow

TURNS = ["Hello", "The quick brown fox", "/reset", "Hello", "/exit", "never read"]
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
            return out.choices[0].message.content

        first = reply([{"role": "user", "content": "Hello"}])
        second = reply(
            [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "The quick brown fox"},
            ]
        )
    assert first and second
    return [first, second, "(conversation cleared)", first]


def test_chat_against_a_running_server(tiny_server, expected_transcript):
    result = run_chat("--url", tiny_server.url, stdin="\n".join(TURNS) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected_transcript


def test_chat_on_a_local_engine(tiny_llama, expected_transcript):
    args = ("--model", str(tiny_llama), "--dtype", "float32", "--device", "cpu")
    result = run_chat(*args, stdin="\n".join(TURNS) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected_transcript


def test_chat_reports_an_unreachable_server():
    result = run_chat("--url", f"http://127.0.0.1:{free_port()}", stdin="Hello\n")
    assert result.returncode == 1
    assert "Error: cannot reach" in result.stderr
