"""Compiled CPU decode steps (AOTInductor): how their builds live and fail. Editing the
source of a model plugin outside tessellm's packages rebuilds its library (the cache key
follows it); a build process that crashes, a missing C++ compiler, compiling turned off or
a tensor-parallel rank each leave eager decode with the reason; Ctrl-C during a build stops
a server at once, compilers and all.

Apart from ``test_cpu_compiled_decode`` (what the compiled steps compute: HF's tokens across
families, batches, preemption and prefix hits) so that each file reads as one theme; the
compile-cache fixtures and helpers are imported from there."""

from __future__ import annotations

import importlib
import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import live_descendants, save_tiny_model, tiny_llama_config
from test_cpu_compiled_decode import (  # noqa: F401 - fixtures
    BUILD_TIMEOUT_S,
    compiled_runner,
    compiling,
    generate_ids,
    needs_compiler,
    no_build_outlives_its_test,
    prompt_ids,
    reference,
)

from tessellm import LLM
from tessellm.interfaces.platform import GraphSpec
from tessellm.plugins import get_plugins, register_plugin
from tessellm_cpu import background_build
from tessellm_cpu.compiled_decode import CompiledDecodeRunner

# Alone, not beside other tests (the README's command runs these after the parallel
# part): they bound how long a shutdown or a switch may take.
pytestmark = pytest.mark.serial

OUTSIDE_PLUGIN = textwrap.dedent(
    """
    from tessellm import hookimpl

    TESSELLM_PLUGIN_API = ">=1.0,<2"

    @hookimpl
    def register_models(register):
        register("OutsideLlamaForCausalLM", "outside_family.model:OutsideLlama")
    """
)
OUTSIDE_MODEL = textwrap.dedent(
    """
    from tessellm.layers.decoder import GatedMLP
    from tessellm_llama.model import LlamaForCausalLM

    MLP_SCALE = {scale}

    class ScaledMLP(GatedMLP):
        def forward(self, x):
            return super().forward(x) * MLP_SCALE

    class OutsideLlama(LlamaForCausalLM):
        def build_layer(self, config, ctx, layer_idx):
            layer = super().build_layer(config, ctx, layer_idx)
            layer.mlp = ScaledMLP(config.hidden_size, config.intermediate_size, ctx)
            return layer
    """
)


@needs_compiler
def test_editing_an_outside_plugin_rebuilds_its_library(prompt_ids, tmp_path, monkeypatch):  # noqa: F811 - fixtures
    # A family in a package not named tessellm_*: its source is part of the key too.
    package = tmp_path / "site" / "outside_family"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(OUTSIDE_PLUGIN)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edit within a second
    path = save_tiny_model(tiny_llama_config(num_hidden_layers=2), tmp_path / "outside")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["OutsideLlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    monkeypatch.setenv("TESSELLM_CACHE", str(cache))

    def run(scale: str) -> tuple[CompiledDecodeRunner, list[list[int]], list[list[int]]]:
        (package / "model.py").write_text(OUTSIDE_MODEL.format(scale=scale))
        sys.modules.pop("outside_family.model", None)  # the engine imports the edited file
        args = dict(model=str(path), dtype="float32", device="cpu")
        compiled = LLM(**args, max_num_seqs=4)
        eager = generate_ids(LLM(**args, enforce_eager=True), prompt_ids[:3])
        return compiled_runner(compiled), generate_ids(compiled, prompt_ids[:3]), eager

    try:
        register_plugin(importlib.import_module("outside_family.plugin"), "outside_family")
        before, tokens, eager = run("0.5")
        assert before.failure is None and tokens == eager and before.steps > 0
        after, edited, eager_edited = run("4.0")
    finally:
        for name in [m for m in sys.modules if m.startswith("outside_family")]:
            del sys.modules[name]
        get_plugins(refresh=True)
    assert eager_edited != eager  # the edit changes the function
    assert after.failure is None and after.steps > 0
    assert edited == eager_edited  # not the stale library's tokens
    assert after.cache_key((1, 16)) != before.cache_key((1, 16))
    assert len(list((cache / "compiled").glob("decode-*.pt2"))) == 2  # a new library


def test_failed_build_falls_back_to_eager(tiny_llama, prompt_ids, reference, monkeypatch):  # noqa: F811 - fixtures
    # A build process that dies (a crash, out of memory): its last words are the reason.
    crash = "import sys; print('MemoryError: out of memory', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(background_build, "child_command", lambda: [sys.executable, "-c", crash])
    monkeypatch.setattr(CompiledDecodeRunner, "cache_key", lambda self, r: "never-built")
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=4)
    runner = compiled_runner(llm)
    assert runner.failure == "the build process exited with code 3: MemoryError: out of memory"
    assert runner.pending == [] and runner.ready_ranges == []
    assert generate_ids(llm, prompt_ids[:2]) == reference[:2]
    assert runner.steps == 0


def test_no_compiler_leaves_decode_eager(tiny_llama, prompt_ids, reference, monkeypatch):  # noqa: F811 - fixtures
    monkeypatch.setattr("shutil.which", lambda name: None)
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=4)
    runner = compiled_runner(llm)
    assert runner.failure == "no C++ compiler (g++) on PATH"
    assert generate_ids(llm, prompt_ids[:2]) == reference[:2]
    assert runner.steps == 0


def test_compiling_can_be_turned_off(tiny_llama, monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    assert compiled_runner(llm).failure == "TESSELLM_CPU_COMPILE=0"
    eager = LLM(model=str(tiny_llama), device="cpu", enforce_eager=True)
    runner = eager.engine.executor.runner
    assert runner.graph_runner is None
    # A tensor-parallel rank's forward has collectives, which are not exported: eager.
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    spec = GraphSpec(8, 512, 16, world_size=2)
    tensor_parallel = CompiledDecodeRunner(runner.model, spec, Path("/nowhere"))
    tensor_parallel.capture()
    assert tensor_parallel.failure == "tensor parallel (2 ranks)"


COMPILERS = {"g++", "c++", "cc1plus", "as", "ld", "collect2", "clang++"}


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@needs_compiler
def test_ctrl_c_during_a_build_stops_the_server_and_its_compilers(
    tiny_llama, tmp_path, monkeypatch
):
    from server_harness import start_server

    cache = tmp_path / "cache"
    monkeypatch.setenv("TESSELLM_CACHE", str(cache))  # empty: the server builds
    server = start_server(tiny_llama, tmp_path)
    pid = server.process.pid
    try:
        # Healthy and answering before any library exists.
        assert not list(cache.glob("compiled/decode-*.pt2"))
        reply = httpx.post(
            server.base_url + "/completions",
            json={"model": str(tiny_llama), "prompt": "hi", "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while not any(process_name(p) in COMPILERS for p in live_descendants(pid)):
            assert time.monotonic() < deadline, "no C++ compiler ever ran"
            assert not list(cache.glob("compiled/decode-*.pt2")), "built before a look"
            time.sleep(0.1)
        build = live_descendants(pid)  # the build process, its compilers
        server.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        server.process.wait(30)
        stopped_after = time.monotonic() - interrupted
    finally:
        server.stop()
    assert stopped_after < 2.0, server.log()
    deadline = time.monotonic() + 1.0  # SIGKILLed already; let the kernel finish them
    while (left := [p for p in build if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], [(p, process_name(p)) for p in left]
    assert "Traceback" not in server.log()
    assert not list(cache.glob("compiled/*.partial*"))
