"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The installed console script, as a user types it (the module form as a fallback).
_script = Path(sys.executable).parent / "tessellm"
TESSELLM = [str(_script)] if _script.exists() else [sys.executable, "-m", "tessellm.cli.app"]


def run_cli(*args: str, timeout: int = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_vars}
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
def test_bad_arguments_exit_2_with_a_message(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
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


def test_version():
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tessellm {version('tessellm')}"


def test_generate_takes_several_prompts_and_an_input_file(tiny_llama, tmp_path):
    engine_args = ("--model", str(tiny_llama), "--max-tokens", "5", "--dtype", "float32")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("The quick brown fox\n\n  \nOnce upon a time\n")
    proc = run_cli(
        "generate",
        "Hello , my name is",
        "--input-file",
        str(prompts_file),
        *engine_args,
        "--no-chat",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0::2] == [
        "--- [1] Hello , my name is",
        "--- [2] The quick brown fox",
        "--- [3] Once upon a time",
    ], proc.stdout
    outputs = lines[1::2]
    assert len(outputs) == 3 and all(o.strip() for o in outputs)
    # Each prompt of the batch gets what it gets alone (greedy).
    alone = run_cli("generate", "The quick brown fox", *engine_args, "--no-chat")
    assert alone.stdout.splitlines() == [outputs[1]]


def test_generate_reports_an_unreadable_input_file(tmp_path):
    proc = run_cli("generate", "--input-file", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2
    assert "cannot read --input-file" in proc.stderr and "Traceback" not in proc.stderr


def test_sampling_options_have_help():
    proc = run_cli("generate", "--help", COLUMNS="200")
    assert proc.returncode == 0, proc.stderr
    help_lines = {line.split()[0]: line for line in proc.stdout.splitlines() if "--top-" in line}
    assert "most likely tokens" in help_lines["--top-k"]
    assert "Nucleus sampling" in help_lines["--top-p"]


def test_help_keeps_option_names_whole_at_80_columns():
    proc = run_cli("bench", "latency", "--help", COLUMNS="80")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    for name in ("--num-iters-warmup", "--attention-backend", "--tensor-parallel-size"):
        assert name in proc.stdout


def test_serve_takes_the_model_as_an_argument_like_vllm(tiny_llama, tmp_path):
    import httpx
    from server_harness import cli_command, free_port

    twice = run_cli("serve", str(tiny_llama), "--model", "other-model")
    assert twice.returncode == 2
    assert "the model is given twice" in twice.stderr

    port = free_port()
    args = cli_command("serve", str(tiny_llama), "--port", str(port), "--device", "cpu")
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        models = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert models is not None, (tmp_path / "serve.log").read_text()
        assert models["data"][0]["id"] == str(tiny_llama)
    finally:
        server.terminate()
        server.wait(30)
