"""Pipeline parallelism (``pipeline_parallel_size``): decoder layers split over stages that
pass hidden states point-to-point (mp over gloo), alone and with tensor parallelism.

Tiny random models of 3 layers (split 2 + 1): a Llama whose LM head is tied to the
embedding (the last stage then holds the embedding too) and a Qwen3-MoE with a dense first
layer. PP=2 and TP=2 x PP=2 must give one process's greedy tokens on a workload with
prefix-cache hits and, on a KV cache too small for all of it, preemptions.
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tessellm import LLM, SamplingParams
from tessellm.cli.app import build_app
from tessellm.config import EngineArgs
from tessellm.engine import pipeline_stage
from tessellm.engine.pipeline_stage import PipelineStageRunner
from tessellm.engine.step_recovery import FailedRequestOutput
from tessellm.errors import ConfigError, WorkerError
from tessellm.executors.start_method import START_METHOD_ENV
from tessellm.interfaces.model import ParallelInfo
from tessellm.interfaces.pipeline import PipelineStage, describe_split, layer_split
from tessellm.layers.pipeline import PipelineMissingLayer
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins
from tessellm.testing.models import tiny_model

# Alone, not beside other tests (the README's command runs these after the parallel
# part): Ray places its actors on a loaded machine late or not at all.
pytestmark = pytest.mark.serial

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
FAMILIES = {
    "LlamaForCausalLM": dict(tie_word_embeddings=True),
    "Qwen3MoeForCausalLM": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[0],
    ),
}
# 16-token block-aligned prefix shared by three prompts, and two unrelated ones.
_rng = random.Random(7)
PREFIX = [_rng.randrange(3, 250) for _ in range(16)]
PROMPTS = [PREFIX + [_rng.randrange(3, 250) for _ in range(n)] for n in (3, 6, 2)] + [
    [_rng.randrange(3, 250) for _ in range(n)] for n in (21, 9)
]
# 14 blocks of 4 tokens: the five requests grow to 135 tokens in all, less 12 of shared
# prefix blocks: they cannot all run at once, and some are preempted.
SMALL_CACHE = dict(block_size=4, num_gpu_blocks_override=14)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory) -> Path:
    overrides = FAMILIES[request.param]
    return tiny_model(request.param, tmp_path_factory.mktemp(request.param), **overrides)


class WatchedStep:
    """A launched step that, once collected, leaves the record of steps in flight."""

    def __init__(self, pending, sampling: set[str], flight: list[set[str]]) -> None:
        self.pending, self.sampling, self.flight = pending, sampling, flight

    def result(self):
        out = self.pending.result()
        self.flight.remove(self.sampling)
        return out


def watch_in_flight(engine) -> list[int]:
    """Record how many steps are in flight at each launch, and check that no two of
    them sample for the same request (the scheduler leaves those in flight out)."""
    flight: list[set[str]] = []
    depths: list[int] = []
    launch = engine._launch

    def watched(plan, previous=None):
        sampling = {s.request_id for s in plan.seqs if s.sample}
        assert all(not (sampling & other) for other in flight), "a request sampled twice"
        step = WatchedStep(launch(plan, previous), sampling, flight)
        flight.append(sampling)
        depths.append(len(flight))
        return step

    engine._launch = watched
    return depths


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", enforce_eager=True, **kwargs)


def run(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(family_model) -> list[list[int]]:
    llm = make_llm(family_model)
    try:
        return run(llm)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_pipeline_matches_one_process(family_model, reference, tp) -> None:
    llm = make_llm(family_model, pipeline_parallel_size=2, tensor_parallel_size=tp, **SMALL_CACHE)
    try:
        engine = llm.engine
        assert engine.describe()["pipeline_parallel_size"] == "2"
        assert len(engine.executor.worker_pids) == 2 * tp
        depths = watch_in_flight(engine)
        assert run(llm) == reference
        # Two steps in flight most of the time: each stage has one to work on.
        assert max(depths) == 2 and depths.count(2) > len(depths) // 2
        stats = engine.stats()
        assert stats["prefix_cache_hit_tokens"] >= 16
        assert stats["num_preemptions"] > 0
        assert stats["kv_cache_usage"] == 0.0 and stats["num_running"] == 0
        # Asked again, the prompts' blocks are in the prefix cache.
        assert run(llm) == reference
    finally:
        engine.shutdown()


def scheduler_workload():
    from test_scheduler import make_request

    shared = list(range(3, 15))  # three blocks of 4 that every short request starts with
    requests = [make_request(f"r{i}", shared + [20 + i] * (i + 1), max_tokens=6) for i in range(6)]
    return [*requests, make_request("long", range(30, 70), max_tokens=5)]


def test_scheduler_keeps_plans_in_flight_disjoint_and_their_kv_valid() -> None:
    """The default scheduler with two plans in flight, on a fake model that checks every
    position a sequence reads holds its own prefix's KV (tests/test_scheduler.py): plans
    run in launch order, as every stage runs them, and come back one behind."""
    from test_scheduler import FakeRunner, make_scheduler, step

    serial = make_scheduler(num_blocks=24, budget=24, max_num_seqs=6)
    for request in (expected := scheduler_workload()):
        serial.add_request(request)
    runner = FakeRunner(serial)
    while serial.has_unfinished():
        step(serial, runner)

    scheduler = make_scheduler(num_blocks=12, budget=24, max_num_seqs=6, max_concurrent_batches=2)
    for request in (requests := scheduler_workload()):
        scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    in_flight: deque = deque()
    depths = []
    preempted_in_flight = 0  # requests preempted while a plan of theirs ran
    while scheduler.has_unfinished() or in_flight:
        while len(in_flight) < 2:
            plan = scheduler.schedule()
            busy = {s.request_id for p, _, _ in in_flight for s in p.seqs}
            preempted_in_flight += len(busy & set(plan.preempted_ids))
            if plan.empty:
                break
            sampling = {s.request_id for s in plan.seqs if s.sample}
            assert all(not (sampling & other) for _, _, other in in_flight)
            result = runner.execute(plan)  # its KV is written before any later plan's
            scheduler.advance(plan)
            in_flight.append((plan, result, sampling))
            depths.append(len(in_flight))
        plan, result, _ = in_flight.popleft()
        scheduler.fill(plan, result)
    assert [r.output_token_ids for r in requests] == [r.output_token_ids for r in expected]
    assert depths.count(2) > len(depths) // 2
    assert preempted_in_flight > 0
    stats = scheduler.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert stats["kv_cache_usage"] == 0.0


def test_ray_executor_runs_the_stages(tiny_llama) -> None:
    ray = pytest.importorskip("ray")
    reference_llm = make_llm(tiny_llama)
    expected = run(reference_llm)
    reference_llm.engine.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        llm = make_llm(tiny_llama, pipeline_parallel_size=2, distributed_executor_backend="ray")
        try:
            assert llm.engine.describe()["executor"] == "ray"
            depths = watch_in_flight(llm.engine)
            assert run(llm) == expected
            assert max(depths) == 2
        finally:
            llm.engine.shutdown()
    finally:
        ray.shutdown()


def test_layer_split_rule() -> None:
    assert layer_split(3, 2) == [(0, 2), (2, 3)]
    assert layer_split(4, 2) == [(0, 2), (2, 4)]
    # The remainder goes one each to the stages just before the last.
    assert layer_split(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert layer_split(7, 7) == [(i, i + 1) for i in range(7)]
    assert describe_split(3, 2, tied_head=True) == [
        "stage 0: layers 0-1 (2) + embedding",
        "stage 1: layers 2-2 (1) + final norm, LM head (tied: + embedding)",
    ]
    with pytest.raises(ConfigError, match="exceeds the model's 3 decoder layers"):
        layer_split(3, 4)


def test_plugins_command_shows_the_split(tiny_llama) -> None:
    app = build_app()
    shown = CliRunner().invoke(app, ["plugins", "--model", str(tiny_llama), "-pp", "2"])
    assert shown.exit_code == 0, shown.output
    assert "pipeline split (pipeline_parallel_size=2, 3 layers):" in shown.stdout
    assert "  stage 0: layers 0-1 (2) + embedding" in shown.stdout
    assert "  stage 1: layers 2-2 (1) + final norm, LM head" in shown.stdout
    refused = CliRunner().invoke(app, ["plugins", "--model", str(tiny_llama), "-pp", "4"])
    assert (
        "refused: pipeline_parallel_size=4 exceeds the model's 3 decoder layers" in refused.stdout
    )


def test_more_stages_than_layers_is_refused(tiny_llama) -> None:
    with pytest.raises(ConfigError, match="pipeline_parallel_size=4 exceeds the model's 3"):
        make_llm(tiny_llama, pipeline_parallel_size=4)
    with pytest.raises(ConfigError, match="needs the mp or ray executor"):
        make_llm(tiny_llama, pipeline_parallel_size=2, distributed_executor_backend="uniproc")
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="speculative decoding does not run with pipeline"):
        make_llm(tiny_llama, pipeline_parallel_size=2, speculative_config=ngram)


def test_a_family_that_cannot_run_in_stages_is_refused(tmp_path) -> None:
    gpt2 = tiny_model("GPT2LMHeadModel", tmp_path / "gpt2")
    with pytest.raises(WorkerError, match="GPT2LMHeadModel does not support pipeline paral"):
        make_llm(gpt2, pipeline_parallel_size=2)
    # Windowed layers free blocks per layer group: refused before any process starts.
    mistral = tiny_model("MistralForCausalLM", tmp_path / "mistral", sliding_window=8)
    with pytest.raises(ConfigError, match="several groups, windowed blocks"):
        make_llm(mistral, pipeline_parallel_size=2)


def test_a_stage_holds_only_its_layers(family_model) -> None:
    """Built in this process as stage 1 of 2 (no process group: nothing is exchanged)."""
    plugins = get_plugins()
    args = EngineArgs(model=str(family_model), dtype="float32", device="cpu")
    resolved = resolve_model(plugins, args.model, args.cache_dir)
    stage = PipelineStage.of(1, 1, 2, 3)
    runner = PipelineStageRunner(args, resolved, ParallelInfo(pipeline=stage), plugins)
    model = runner.model.inner
    layers = model.model.layers
    assert [isinstance(layer, PipelineMissingLayer) for layer in layers] == [True, True, False]
    assert model.model.norm is not None and model.lm_head is not None
    tied = bool(model.config.tie_word_embeddings)
    assert (model.model.embed_tokens is not None) == tied
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith(("model.layers.0.", "model.layers.1.")) for name in names)
    assert len(runner.attn_layers) == 1
    # The KV cache is this stage's one layer.
    runner.initialize_cache(4)
    assert runner.attn_layers[0].k_cache.shape[0] == 4
    first = PipelineStage.of(0, 1, 2, 3)
    head = PipelineStageRunner(args, resolved, ParallelInfo(pipeline=first), plugins).model.inner
    assert head.lm_head is None and head.model.norm is None
    assert len([m for m in head.model.layers if not isinstance(m, PipelineMissingLayer)]) == 2
    if tied:  # the last stage's tied head reads the same embedding the first stage has
        assert torch.equal(head.model.embed_tokens.weight, model.lm_head.weight)


POISON = 251  # a token none of PROMPTS has: the first stage raises on it


def test_a_stage_that_raises_fails_only_the_request_to_blame(tiny_llama, monkeypatch) -> None:
    """Stage 0 raises for one request; stage 1 is told so through the status header (no
    hang), the plan behind it is dropped and rewound, and the step is recovered as usual:
    that request fails, the others give one process's tokens, the workers serve on."""
    embed = pipeline_stage.embed

    def poisoned_embed(body, input_ids):
        if bool((input_ids == POISON).any()):
            raise ValueError("poisoned token on the first stage")
        return embed(body, input_ids)

    reference_llm = make_llm(tiny_llama)
    expected = run(reference_llm)
    reference_llm.engine.shutdown()
    monkeypatch.setattr(pipeline_stage, "embed", poisoned_embed)
    monkeypatch.delenv(START_METHOD_ENV, raising=False)  # forked workers inherit the patch
    llm = make_llm(tiny_llama, pipeline_parallel_size=2)
    try:
        prompts = [*PROMPTS[:2], [5, POISON, 7, 9], *PROMPTS[2:]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
        failed = outs.pop(2)
        assert isinstance(failed, FailedRequestOutput)
        assert "poisoned token" in repr(failed.error) + repr(failed.error.__cause__)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert llm.engine.executor.failure is None
        assert run(llm) == expected
    finally:
        llm.engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_pp2_over_nccl_matches_one_process(family_model) -> None:
    def tokens(**kwargs) -> list[list[int]]:
        llm = LLM(model=str(family_model), dtype="float32", device="cuda", **kwargs)
        try:
            return run(llm)
        finally:
            llm.engine.shutdown()

    assert tokens(pipeline_parallel_size=2, **SMALL_CACHE) == tokens()
