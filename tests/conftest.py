"""Shared fixtures of the repository's own tests: the tiny Llama, its prompt ids, a live server.

Model and reference helpers come from ``tessellm.testing`` (the installed test kit).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# The helpers live in the installed test kit; tests import them from here as before.
from tessellm.testing import (  # noqa: F401 - re-exported for `from conftest import ...`
    TEST_PROMPTS,
    TINY_DECODER,
    hf_continuation,
    hf_greedy,
    make_tokenizer,
    save_tiny_model,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models gain nothing from intra-op threads, and tests start engine subprocesses
# (servers, tensor-parallel workers) that would fight over the same two cores. The CPU
# platform respects OMP_NUM_THREADS, and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Worker processes of tiny models start in seconds and step in milliseconds: a start-up or
# a step that hangs (a rendezvous that never completes) fails its test within minutes
# rather than the defaults' 15 and 5 (what a real model on a busy machine may need).
os.environ.setdefault("TESSELLM_WORKER_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("TESSELLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "180")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Engines in tests run their CPU decode steps eagerly: compiling one (a C++ build) per test
# model would take most of the suite's time. test_cpu_compiled_decode.py turns it on.
os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")
# Without a GPU, Triton kernels run only in its interpreter, and Triton reads the switch
# once, when it is first imported: some dependencies (compressed-tensors) import it, so
# it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def use_triton_plugins(*plugin_srcs: str) -> None:
    """Module-level set-up of a Triton test file, before it imports any kernel: without a
    GPU the kernels run in Triton's interpreter (read when a kernel is defined); the file
    is skipped without Triton; ``plugin_srcs`` (repo-relative) become importable."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    for src in plugin_srcs:
        if str(REPO_ROOT / src) not in sys.path:
            sys.path.append(str(REPO_ROOT / src))


def live_descendants(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc), multiprocessing's resource tracker aside."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                tracker = b"resource_tracker" in f.read()
        except OSError:
            continue
        if state != "Z" and not tracker:
            parents[int(entry)] = int(ppid)
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**TINY_DECODER, **overrides})
    config.architectures = ["LlamaForCausalLM"]
    return config


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_prompt_ids(tiny_llama) -> list[list[int]]:
    """TEST_PROMPTS in the tiny Llama's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return [tok.encode(p) for p in TEST_PROMPTS]


@pytest.fixture(scope="session")
def tiny_server(tiny_llama, tmp_path_factory):
    """One real ``tessellm serve`` process on the tiny Llama, shared by the server tests."""
    from server_harness import start_server

    server = start_server(
        tiny_llama, tmp_path_factory.mktemp("server-logs"), "--max-num-seqs", "64"
    )
    yield server
    server.stop()


def in_process_plugin(name: str = "in_process_test_plugin", **hooks):
    """A plugin module made in the test: ``hooks`` maps hook names to their bodies."""
    import types

    from tessellm import hookimpl

    plugin = types.ModuleType(name)
    plugin.TESSELLM_PLUGIN_API = ">=1.0,<2"
    for hook_name, body in hooks.items():
        setattr(plugin, hook_name, hookimpl(body))
    return plugin


@pytest.fixture
def fresh_plugins():
    """Plugins discovered anew around the test, so in-process registrations are forgotten."""
    from tessellm.plugins import get_plugins

    get_plugins(refresh=True)
    yield
    get_plugins(refresh=True)


def run_to_end(engine: Any) -> dict[str, Any]:
    """Step ``engine`` until nothing is left: each request's final output, by id."""
    finals: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals
