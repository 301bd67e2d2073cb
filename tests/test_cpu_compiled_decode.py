"""Compiled CPU decode steps (AOTInductor): the engine serves eagerly while the libraries
build in the background, then runs them; the same greedy tokens as HF in fp32 either
way, batched and alone, after prefix-cache hits and preemption, across model families;
within HF's top-5 in bf16 with int4 weights; a library built once is loaded from the
cache. The traced attention computes what the eager backend computes.

How builds live and fail (a plugin edit rebuilding, a crashed build, no compiler,
compiling off, Ctrl-C during a build) is ``test_cpu_compiled_builds``, which imports this
module's compile-cache fixtures."""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import (
    TEST_PROMPTS,
    hf_greedy,
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
from tessellm_attention_cpu.backend import CpuPagedAttention
from tessellm_attention_cpu.traced import traced_decode
from tessellm_cpu import background_build
from tessellm_cpu.compiled_decode import CompiledDecodeRunner, compiler_missing

NEW_TOKENS = 16
# Building a library needs a C++ compiler; without one the runner's fallback is what runs
# (test_cpu_compiled_builds hides the compiler to test it).
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
