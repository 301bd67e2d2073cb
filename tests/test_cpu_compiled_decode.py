"""Compiled CPU decode steps (AOTInductor): the engine serves eagerly while the libraries
build in the background, then runs them; the same greedy tokens as HF in fp32 either
way, batched and alone, after prefix-cache hits and preemption; within HF's top-5 in
bf16 with int4 weights; a library built once is loaded from the cache; eager decode when
compiling is off or fails; Ctrl-C during a build stops a server at once, compilers and
all. The traced attention computes what the eager backend computes."""

from __future__ import annotations

import importlib
import json
import random
import signal
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    TEST_PROMPTS,
    hf_greedy,
    live_descendants,
    save_tiny_model,
    tiny_llama_config,
)
from test_cpu_bf16 import hf_top5_misses, snap_to_4bit_grid
from test_parity_gemma_phi_gpt import (
    PHI3_LONG_ORIGINAL_MAX,
    gemma2_config,
    gpt2_config,
    phi3_long_config,
)
from test_parity_qwen_mistral import WINDOW, qwen3_config, qwen3_moe_config

from tessellm import LLM, SamplingParams
from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm.interfaces.platform import GraphSpec
from tessellm.plugins import get_plugins, register_plugin
from tessellm_attention_cpu.backend import CpuPagedAttention
from tessellm_attention_cpu.traced import traced_decode
from tessellm_cpu import background_build
from tessellm_cpu.compiled_decode import CompiledDecodeRunner, compiler_missing

NEW_TOKENS = 16
# Building a library needs a C++ compiler; without one the runner's fallback is what runs
# (tested below by hiding the compiler).
needs_compiler = pytest.mark.skipif(
    compiler_missing() is not None, reason="no C++ compiler to build decode libraries"
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
BUILD_TIMEOUT_S = 900  # a tiny model's library: 15 s on two idle cores, minutes when busy


@pytest.fixture(scope="module", autouse=True)
def compiling(tmp_path_factory):
    """Compiling on, into a cache of this module's own (empty at the start)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSELLM_CPU_COMPILE", "1")
        mp.setenv("TESSELLM_CACHE", str(tmp_path_factory.mktemp("compile-cache")))
        # The libraries check every input's dtype, sizes and strides against the traced
        # ones (off by default: a cost per input per step).
        mp.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")
        yield


@pytest.fixture(autouse=True)
def no_build_outlives_its_test():
    yield
    for build in list(background_build._LIVE):
        build.kill()


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama_prompt_ids):
    return tiny_llama_prompt_ids


@pytest.fixture(scope="module")
def reference(tiny_llama, prompt_ids):
    return hf_greedy(tiny_llama, prompt_ids, NEW_TOKENS)


def generate_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def compiled_runner(llm: LLM, wait: bool = True) -> CompiledDecodeRunner:
    """The engine's runner; with ``wait``, once its background build has ended."""
    runner = llm.engine.executor.runner.graph_runner
    assert isinstance(runner, CompiledDecodeRunner)
    if wait:
        runner.wait_ready(BUILD_TIMEOUT_S)
    return runner


@needs_compiler
def test_fp32_serves_eagerly_while_building_then_compiled(tiny_llama, prompt_ids, reference):
    started = time.monotonic()
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    runner = compiled_runner(llm, wait=False)
    # An empty cache: the engine is up at once, both libraries building in the background.
    assert runner.pending == [(1, 16), (17, 64)]
    assert generate_ids(llm, prompt_ids) == reference
    served = time.monotonic() - started
    assert runner.steps == 0  # every decode step ran eagerly
    assert not runner.library_path((1, 16)).exists(), f"built within {served:.1f} s?"
    assert runner.pending == [(1, 16), (17, 64)]
    assert runner.wait_ready(BUILD_TIMEOUT_S), runner.failure
    assert runner.failure is None and runner.pending == []
    assert generate_ids(llm, prompt_ids) == reference
    batched_steps = runner.steps
    assert batched_steps >= NEW_TOKENS - 1
    for prompt, expected in zip(prompt_ids[:3], reference[:3], strict=True):
        assert generate_ids(llm, [prompt]) == [expected]
    assert runner.steps >= batched_steps + 3 * (NEW_TOKENS - 1)
    # 20 sequences at once: the second library (17-64 sequences, dense linears).
    assert runner.ready_ranges == [(1, 16), (17, 64)]
    rng = random.Random(5)
    many = [[rng.randrange(3, 256) for _ in range(rng.randrange(2, 30))] for _ in range(20)]
    before = runner.steps
    assert generate_ids(llm, many) == hf_greedy(tiny_llama, many, NEW_TOKENS)
    assert runner.steps >= before + NEW_TOKENS - 1


@needs_compiler
def test_cached_library_survives_preemption_and_prefix_hits(
    tiny_llama, prompt_ids, reference, monkeypatch
):
    def no_build(*args, **kwargs):
        raise AssertionError("the library should come from the cache")

    monkeypatch.setattr(background_build, "BuildProcess", no_build)
    # 5 blocks of 16 tokens: the longest prompts cannot all run at once.
    llm = LLM(
        model=str(tiny_llama),
        dtype="float32",
        device="cpu",
        num_gpu_blocks_override=5,
        enable_prefix_caching=True,
    )
    runner = compiled_runner(llm, wait=False)
    assert runner.failure is None
    # Loaded when the engine started: compiled from the first decode step.
    assert runner.ready_ranges == [(1, 16), (17, 64)] and runner.pending == []
    shared = [prompt_ids[2] + p for p in prompt_ids[:3]]
    expected = hf_greedy(tiny_llama, shared, NEW_TOKENS)
    assert generate_ids(llm, [prompt_ids[2], *shared]) == [reference[2], *expected]
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_hit_tokens"] > 0
    assert runner.steps > 0
    assert stats["kv_cache_usage"] == 0.0


@needs_compiler
def test_bf16_int4_compiled_decode_stays_within_hf_top5(tmp_path):
    path = save_tiny_model(tiny_llama_config(), tmp_path / "grid")
    snap_to_4bit_grid(path)
    llm = LLM(model=str(path), dtype="bfloat16", device="cpu", max_num_seqs=8)
    assert llm.engine.executor.runner.quantization == "woq_grid"
    runner = compiled_runner(llm)
    assert runner.failure is None
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in TEST_PROMPTS[:4]]
    for prompt, tokens in zip(prompts, generate_ids(llm, prompts), strict=True):
        assert len(tokens) == NEW_TOKENS
        assert hf_top5_misses(path, prompt, tokens) == []
    assert runner.steps >= NEW_TOKENS - 1


# Soft-capping and sliding windows (Gemma 2), LongRoPE past the original context (Phi-3),
# learned positions and LayerNorm (GPT-2), per-head q/k norms (Qwen3), routed experts
# (Qwen3-MoE: the expert loop reads each expert's row count on the host, which the exporter
# cannot trace, so its decode steps stay eager).
EAGER_FAMILIES = {"Qwen3MoeForCausalLM"}
FAMILIES = {
    "Gemma2ForCausalLM": gemma2_config,
    "Phi3ForCausalLM": phi3_long_config,
    "GPT2LMHeadModel": gpt2_config,
    "Qwen3ForCausalLM": lambda: qwen3_config(WINDOW),
    "Qwen3MoeForCausalLM": lambda: qwen3_moe_config(WINDOW),
}


@needs_compiler
@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_model_families_compile_and_match_hf(architecture, tmp_path):
    from transformers import PreTrainedTokenizerFast

    config = FAMILIES[architecture]()
    config.architectures = [architecture]
    path = save_tiny_model(config, tmp_path / architecture)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    shortest = PHI3_LONG_ORIGINAL_MAX if architecture == "Phi3ForCausalLM" else 0
    prompts = [ids for p in TEST_PROMPTS if len(ids := tok.encode(p)) > shortest][:4]
    reference = hf_greedy(path, prompts, NEW_TOKENS, attn_implementation="eager")
    # Compiled steps read one block table: windowed layers share the full layers' table.
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        max_num_seqs=8,
        disable_hybrid_kv_cache_manager=True,
    )
    runner = compiled_runner(llm)
    assert generate_ids(llm, prompts) == reference
    if architecture in EAGER_FAMILIES:
        assert runner.failure  # the reason is logged
        assert runner.steps == 0
    else:
        assert runner.failure is None
        assert runner.steps >= NEW_TOKENS - 1


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
def test_editing_an_outside_plugin_rebuilds_its_library(prompt_ids, tmp_path, monkeypatch):
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


def test_failed_build_falls_back_to_eager(tiny_llama, prompt_ids, reference, monkeypatch):
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


def test_no_compiler_leaves_decode_eager(tiny_llama, prompt_ids, reference, monkeypatch):
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


@pytest.mark.parametrize(("window", "cap"), [(None, None), (5, None), (None, 30.0), (7, 20.0)])
def test_traced_decode_matches_the_planned_backend(window, cap):
    torch.manual_seed(0)
    heads, kv_heads, head_size, block_size, num_blocks = 4, 2, 16, 4, 12
    spec = AttentionSpec(
        "cpu", torch.float32, head_size, heads, kv_heads, block_size, bool(window), bool(cap)
    )
    backend = CpuPagedAttention(spec)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_size)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_size)
    seq_lens = torch.tensor([3, 9, 14], dtype=torch.int32)
    tables = torch.tensor([[5, 0, 0, 0], [2, 7, 1, 0], [11, 3, 8, 4]], dtype=torch.int32)
    query = torch.randn(3, heads, head_size)
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(4, dtype=torch.int32),
        seq_lens=seq_lens,
        block_tables=tables,
        slot_mapping=torch.zeros(3, dtype=torch.int64),
        max_query_len=1,
        max_seq_len=14,
        query_start_loc_cpu=torch.arange(4, dtype=torch.int32),
        seq_lens_cpu=seq_lens,
    )
    expected = backend.forward(
        query, k_cache, v_cache, metadata, scale=0.25, sliding_window=window, logits_soft_cap=cap
    )
    got = traced_decode(query, k_cache, v_cache, tables, seq_lens, 0.25, window, cap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
