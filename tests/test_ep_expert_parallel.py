"""Expert parallelism (``enable_expert_parallel``): whole experts spread over the
tensor-parallel ranks, tokens' partial sums combined through all-to-all (mp over gloo).

Tiny random Mixtral and Qwen3-MoE (fp32, 4 experts, 2 per token: 2 whole experts per rank;
the Qwen3-MoE keeps a dense MLP in layer 0). EP=2 must give a single process's greedy
tokens for a batch and for one prompt alone (one decode token: rank 1 owns no token).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import TEST_PROMPTS

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.engine.model_runner import ModelRunner
from tessellm.errors import ConfigError
from tessellm.executors.start_method import START_METHOD_ENV
from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers import moe
from tessellm.layers.moe import FusedExperts, check_expert_parallel_fit, expert_weight_rules
from tessellm.layers.weight_loading import load_by_rules
from tessellm.model_loader import model_bytes, resolve_model
from tessellm.plugins import get_plugins
from tessellm.testing import tiny_config
from tessellm.testing.models import tiny_model

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
MOE_MODELS = {
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen3MoeForCausalLM": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[0],
    ),
}


@pytest.fixture(scope="module", params=list(MOE_MODELS))
def moe_model(request, tmp_path_factory) -> Path:
    overrides = MOE_MODELS[request.param]
    return tiny_model(request.param, tmp_path_factory.mktemp(request.param), **overrides)


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", **kwargs)


def greedy(llm: LLM, prompts: list[str]) -> tuple[list[list[int]], torch.Tensor]:
    outs = llm.generate(prompts, GREEDY)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [
        step[tok].logprob
        for o in outs
        for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
    ]
    return tokens, torch.tensor(logprobs)


def test_ep2_over_gloo_matches_one_process(moe_model, tmp_path, monkeypatch) -> None:
    single = make_llm(moe_model)
    batch_1, logprobs_1 = greedy(single, TEST_PROMPTS)
    alone_1, _ = greedy(single, TEST_PROMPTS[2:3])
    # Plain TP gives these tokens too: the forked workers inherit a wrapper that notes
    # which processes ran the expert-parallel layer.
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    ran_ep = tmp_path / "ran-ep"
    ep_moe = moe.expert_parallel_moe

    def noting_moe(*args, **kwargs):
        with ran_ep.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return ep_moe(*args, **kwargs)

    monkeypatch.setattr(moe, "expert_parallel_moe", noting_moe)
    llm = make_llm(moe_model, tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        assert llm.engine.describe()["executor"] == "mp"
        batch_2, logprobs_2 = greedy(llm, TEST_PROMPTS)
        alone_2, _ = greedy(llm, TEST_PROMPTS[2:3])
        assert set(ran_ep.read_text().split()) == {str(p) for p in llm.engine.executor.worker_pids}
    finally:
        llm.engine.shutdown()
    assert batch_2 == batch_1
    assert alone_2 == alone_1
    torch.testing.assert_close(logprobs_2, logprobs_1, atol=1e-4, rtol=0)


def test_each_rank_holds_only_its_experts(moe_model, tmp_path) -> None:
    """Each rank's model is built and loaded as a worker builds it (no collective runs
    before a step): rank r holds experts 2r and 2r+1 whole, as the single process has them."""
    plugins = get_plugins()
    resolved = resolve_model(plugins, str(moe_model), tmp_path)

    def runner(parallel: ParallelInfo) -> ModelRunner:
        args = EngineArgs(model=str(moe_model), dtype="float32", device="cpu")
        return ModelRunner(args, resolved, parallel=parallel, plugins=plugins)

    whole = runner(ParallelInfo())
    whole_experts = [m for m in whole.model.modules() if isinstance(m, FusedExperts)]
    for rank in range(2):
        shard = runner(ParallelInfo(rank, 2, expert_parallel=True))
        experts = [m for m in shard.model.modules() if isinstance(m, FusedExperts)]
        assert len(experts) == len(whole_experts) > 0
        for mine, full in zip(experts, whole_experts, strict=True):
            assert (mine.num_local_experts, mine.first_expert) == (2, 2 * rank)
            for name in ("gate_up_proj", "down_proj"):
                torch.testing.assert_close(
                    getattr(mine, name), getattr(full, name)[2 * rank : 2 * rank + 2]
                )
        held = sum(p.numel() for e in experts for p in e.parameters())
        assert held * 2 == sum(p.numel() for e in whole_experts for p in e.parameters())
        assert model_bytes(shard.model) < model_bytes(whole.model)


def test_experts_that_do_not_split_are_refused_before_spawning(tmp_path) -> None:
    path = tiny_model(
        "MixtralForCausalLM", tmp_path / "three", num_local_experts=3, num_experts_per_tok=2
    )
    with pytest.raises(ConfigError, match="3 experts do not divide evenly over"):
        make_llm(path, tensor_parallel_size=2, enable_expert_parallel=True)
    check_expert_parallel_fit(tiny_config("LlamaForCausalLM"), 2)  # dense: nothing to split
    config = tiny_config("Qwen3MoeForCausalLM", num_experts=6)
    check_expert_parallel_fit(config, 2)
    with pytest.raises(ConfigError, match=r"6 experts .* tensor_parallel_size=4"):
        check_expert_parallel_fit(config, 4)


def test_rank_experts_partial_sums_add_up_to_the_whole_layer() -> None:
    """Global expert ids in, only this rank's pairs computed: the ranks' outputs sum to the
    single layer's, and checkpoint tensors of other ranks' experts are never copied."""
    torch.manual_seed(0)
    experts, hidden, inner = 4, 16, 8
    weights = {}
    for e in range(experts):
        for piece, shape in (("gate", (inner, hidden)), ("up", (inner, hidden))):
            weights[f"mlp.experts.{e}.{piece}_proj.weight"] = torch.randn(shape)
        weights[f"mlp.experts.{e}.down_proj.weight"] = torch.randn(hidden, inner)
    rules = expert_weight_rules("gate_proj", "up_proj", "down_proj")

    def layer(parallel: ParallelInfo) -> FusedExperts:
        ctx = ModelContext(torch.float32, torch.device("cpu"), None, None, parallel)  # type: ignore[arg-type]
        holder = torch.nn.Module()
        holder.mlp = torch.nn.Module()
        holder.mlp.experts = FusedExperts(experts, hidden, inner, ctx)
        load_by_rules(holder, weights.items(), rules)
        return holder.mlp.experts

    x = torch.randn(9, hidden)
    route = torch.topk(torch.softmax(torch.randn(9, experts), dim=-1), 2)
    whole = layer(ParallelInfo())(x, route.values, route.indices)
    total = torch.zeros_like(x)
    for rank in range(2):
        shard = layer(ParallelInfo(rank, 2, expert_parallel=True))
        partial = shard(x, route.values, route.indices)
        untouched = ~(route.indices // 2 == rank).any(dim=1)
        assert partial[untouched].abs().sum() == 0
        total += partial
    torch.testing.assert_close(total, whole)
    with pytest.raises(ConfigError, match="4 experts do not divide evenly over"):
        layer(ParallelInfo(0, 3, expert_parallel=True))
