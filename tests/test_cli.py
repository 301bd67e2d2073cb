"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The installed console script, as a user types it (the module form as a fallback).
_script = Path(sys.executable).parent / "tessellm"
TESSELLM = [str(_script)] if _script.exists() else [sys.executable, "-m", "tessellm.cli.app"]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*TESSELLM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_generate_prints_text_and_exits_zero(tiny_llama):
    proc = run_cli(
        "generate",
        "Hello , my name is",
        "--model",
        str(tiny_llama),
        "--max-tokens",
        "6",
        "--dtype",
        "float32",
        "--no-chat",
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert len(words) >= 3  # six word-level tokens, some may be special and skipped
    assert "Traceback" not in proc.stderr


def test_generate_is_deterministic_with_greedy(tiny_llama):
    args = (
        "generate",
        "The quick brown fox",
        "--model",
        str(tiny_llama),
        "--max-tokens",
        "5",
        "--dtype",
        "float32",
        "--no-chat",
    )
    assert run_cli(*args).stdout == run_cli(*args, "--enforce-eager").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "hi", "--no-such-flag"), "No such option"),
        (("generate", "hi", "--max-tokens", "0"), "max-tokens"),
        (("generate", "hi", "--model", "/does/not/exist"), "neither a local path"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(args, message):
    proc = run_cli(*args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugins_lists_installed_and_explains_choice(tiny_llama):
    proc = run_cli("plugins", "--model", str(tiny_llama))
    assert proc.returncode == 0, proc.stderr
    for expected in (
        "tessellm.builtin",
        "llama",
        "models: LlamaForCausalLM",
        "platform: cpu",
        "attention:",
    ):
        assert expected in proc.stdout


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "generate" in proc.stdout and "plugins" in proc.stdout
