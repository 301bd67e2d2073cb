"""Compiled CPU decode steps over several KV groups: a Gemma 3 with windowed and full
layers keeps its windowed layers in tables of their own (the hybrid KV cache manager, the
default) and still decodes on its AOTInductor library, one block table per group; greedy
tokens equal the eager run's and transformers' fp32 ones, with contexts past the window
so that windowed groups' tables point at the null page while the library runs. One tiny
model, one library (1-16 sequences), built once for the module; verification steps
(speculative decoding) padded over every group's table, on the traced step run eagerly."""

from __future__ import annotations

import logging

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.testing import hf_greedy, tiny_model
from tessellm.testing.conformance.speculative import REPEATING_PROMPTS
from tessellm_cpu import background_build, compiled_decode
from tessellm_cpu.compiled_decode import CompiledDecodeRunner, compiler_missing
from tessellm_cpu.decode_groups import layout_facts, write_check
from tessellm_cpu.decode_step import DecodeStep
from tessellm_cpu.platform import CpuPlatform

WINDOW = 8
BLOCK_SIZE = 4
NEW_TOKENS = 20
# 2 full and 4 windowed layers: groups of 2 layers (one full, two windowed), 2 cache
# tensor pairs shared by the groups' layers.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
PROMPTS = [
    [5, 17, 33, 8, 90, 4, 61, 12, 7, 3, 150, 22, 9, 41],
    [11, 3, 200, 47],
    [7 + (3 * i) % 190 for i in range(27)],
    [99, 98, 97, 96, 95, 94, 93, 92, 91],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
BUILD_TIMEOUT_S = 900
needs_compiler = pytest.mark.skipif(
    compiler_missing() is not None, reason="no C++ compiler to build decode libraries"
)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Libraries built before serving, into a cache of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSELLM_CPU_COMPILE", "wait")
        mp.setenv("TESSELLM_CACHE", str(tmp_path_factory.mktemp("groups-cache")))
        # The library checks every input's dtype, sizes and strides against the traced ones.
        mp.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")
        yield


@pytest.fixture(autouse=True)
def no_build_outlives_its_test():
    yield
    for build in list(background_build._LIVE):
        build.kill()


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return tiny_model(
        "Gemma3ForCausalLM",
        tmp_path_factory.mktemp("groups") / "gemma3",
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=LAYER_TYPES,
        sliding_window=WINDOW,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="module")
def reference(gemma3):
    return hf_greedy(gemma3, PROMPTS, NEW_TOKENS, attn_implementation="eager")


def engine(path, **kwargs) -> LLM:
    return LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        block_size=BLOCK_SIZE,
        max_num_seqs=8,
        **kwargs,
    )


def generate_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def compiled(gemma3, compile_cache) -> LLM:
    return engine(gemma3)


@needs_compiler
def test_windowed_groups_decode_compiled_with_eager_and_hf_tokens(
    compiled, gemma3, reference, monkeypatch
):
    runner = compiled.engine.executor.runner.graph_runner
    assert isinstance(runner, CompiledDecodeRunner)
    layout = compiled.engine.executor.runner.cache_layout
    assert [(len(g.layers), g.window) for g in layout.groups] == [
        (2, None),
        (2, WINDOW),
        (2, WINDOW),
    ]
    assert runner.num_groups == 3
    assert runner.wait_ready(BUILD_TIMEOUT_S), runner.failure
    assert runner.failure is None and runner.ready_ranges == [(1, 16)]
    # Every compiled step's group tables, to see the null page in them.
    null = compiled.engine.kv_cache_manager.null_block
    seen: list[bool] = []
    step_inputs = compiled_decode.step_inputs

    def recording(metadata, num_groups):
        inputs = step_inputs(metadata, num_groups)
        seen.append(any(bool((t == null).any()) for t in inputs[: num_groups - 1]))
        return inputs

    monkeypatch.setattr(compiled_decode, "step_inputs", recording)
    before = runner.steps
    assert generate_ids(compiled, PROMPTS) == reference
    assert runner.steps >= before + NEW_TOKENS - 1  # decodes ran on the library
    assert any(seen), "no windowed block was freed during a compiled step"
    for prompt, expected in zip(PROMPTS[:2], reference[:2], strict=True):
        assert generate_ids(compiled, [prompt]) == [expected]
    assert runner.steps >= before + 3 * (NEW_TOKENS - 1)
    eager = engine(gemma3, enforce_eager=True)
    assert eager.engine.executor.runner.graph_runner is None
    assert generate_ids(eager, PROMPTS) == reference


@needs_compiler
def test_shared_caches_are_written_in_place_and_the_key_names_the_groups(
    compiled, gemma3, monkeypatch
):
    runner = compiled.engine.executor.runner.graph_runner
    caches = runner._kv_caches()
    # One input pair per layer: layers 0, 2 and 3 (position 0 of their groups) share K.
    assert len(caches) == 12 and len({id(t) for t in caches}) == 4
    assert caches[0] is caches[4] is caches[6] and caches[0] is not caches[2]
    assert layout_facts(runner.attn_layers) == [1, 1, 0, 2, 2, 0]
    # The library writes each aliased input in place: every group's keys reach its pages
    # (checked when it was loaded; once more here on scratch caches).
    library = runner._libraries[0][2]
    assert write_check(library, runner.attn_layers, runner.weights, 1, 2) is None

    # A library that writes nothing (as one writing through copies would lose pages).
    class Silent:
        def boxed_run(self, inputs):
            return [torch.zeros(1, 64)]

    reason = write_check(Silent(), runner.attn_layers, runner.weights, 1, 2)
    assert reason == "layer 0's keys are missing from its group's pages"
    before = list(runner._libraries)
    runner._add_library((1, 16), Silent())
    assert runner._libraries == before  # not taken: such steps stay on what they had
    # One shared table (graph runners' old layout): a library of its own.
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")
    shared = engine(gemma3, disable_hybrid_kv_cache_manager=True)
    one_table = shared.engine.executor.runner.graph_runner
    assert one_table.num_groups == 1 and layout_facts(one_table.attn_layers) is None
    assert len({id(t) for t in one_table._kv_caches()}) == 12
    assert one_table.cache_key((1, 16)) != runner.cache_key((1, 16))


def test_a_platform_without_group_support_leaves_such_models_eager(gemma3, monkeypatch, caplog):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")
    monkeypatch.setattr(CpuPlatform, "graph_runner_serves_kv_groups", False)
    with caplog.at_level(logging.INFO, logger="tessellm.engine.model_runner"):
        llm = engine(gemma3)
    assert llm.engine.executor.runner.graph_runner is None
    assert "graph runner reads one KV block table, this model has 3 KV groups" in caplog.text


class EagerTracedVerifier:
    """Stands in for a verification library: the step module it is exported from, run
    eagerly with the attention on its traced path (what the library computes)."""

    def __init__(self, runner: CompiledDecodeRunner) -> None:
        self.runner = runner
        self.step = DecodeStep(runner.model, runner.attn_layers, runner.verify.query_len)
        self.group_inputs: list[int] = []

    def boxed_run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        ids, positions, slots, tables, seq_lens = inputs[:5]
        groups = inputs[5 + len(self.runner._static) :]
        half = len(groups) // 2
        self.group_inputs.append(len(groups))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.compiler, "is_compiling", lambda: True)
            kv, weights = self.runner._kv_caches(), self.runner.weights
            hidden = self.step(
                ids, positions, slots, tables, seq_lens, kv, weights, groups[:half], groups[half:]
            )
        return [hidden]


def test_verification_steps_pad_every_groups_slots(gemma3, monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")  # no build: the stand-in library runs
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = engine(gemma3, speculative_config=spec)
    runner = llm.engine.executor.runner.graph_runner
    assert isinstance(runner, CompiledDecodeRunner) and runner.verify.query_len == 4
    verifier = EagerTracedVerifier(runner)
    runner.verify.add(1, 16, verifier)
    expected = hf_greedy(gemma3, REPEATING_PROMPTS, NEW_TOKENS, attn_implementation="eager")
    assert generate_ids(llm, REPEATING_PROMPTS) == expected
    assert runner.verify_steps > 0
    assert set(verifier.group_inputs) == {4}  # two further groups: tables, slot mappings
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0
