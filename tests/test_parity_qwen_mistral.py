"""Qwen2/Qwen3/Qwen3-MoE and Mistral/Mixtral beyond plain parity: HF's tokens depend on the
window, the family plugins provide the architectures, the fused MoE layer, tensor-parallel
MoE parity with HF.

Tiny random models (fp32, CPU) with grouped-query attention and a sliding window of 8
tokens, shorter than several prompts and than every prompt plus its 32 new tokens; the MoE
models have 4 experts, 2 per token. (Greedy parity with HF, batched, alone, with prefix-cache
hits and under preemption, runs in plugins/qwen/tests and plugins/mistral/tests through
tessellm.testing; the test here that HF's tokens change without the window shows that those
equal tokens really apply it.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TEST_PROMPTS, TINY_DECODER, hf_greedy, save_tiny_model

from tessellm import LLM, SamplingParams
from tessellm.errors import ModelLoadError
from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.moe import FusedExperts, SparseMoeBlock, expert_weight_rules
from tessellm.layers.weight_loading import load_by_rules
from tessellm.plugins import get_plugins

NEW_TOKENS = 32
WINDOW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

MOE = dict(num_experts_per_tok=2)


def qwen2_config(window: int | None):
    from transformers import Qwen2Config

    # Layer 0 full attention, layers 1-2 windowed (transformers: i >= max_window_layers).
    return Qwen2Config(
        **TINY_DECODER,
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=1,
    )


def qwen3_config(window: int | None):
    from transformers import Qwen3Config

    # head_dim 32 != hidden/heads; tied head as the small Qwen3 models have it.
    return Qwen3Config(
        **{**TINY_DECODER, "tie_word_embeddings": True},
        head_dim=32,
        use_sliding_window=window is not None,
        sliding_window=window,
        max_window_layers=1,
    )


def qwen3_moe_config(window: int | None):
    from transformers import Qwen3MoeConfig

    # Layer 0 keeps a dense MLP; top-k weights are not renormalised (norm_topk_prob off).
    return Qwen3MoeConfig(
        **TINY_DECODER,
        **MOE,
        head_dim=16,
        num_experts=4,
        moe_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        use_sliding_window=window is not None,
        sliding_window=window,
    )


def mistral_config(window: int | None):
    from transformers import MistralConfig

    return MistralConfig(**TINY_DECODER, sliding_window=window)


def mixtral_config(window: int | None):
    from transformers import MixtralConfig

    return MixtralConfig(**TINY_DECODER, **MOE, num_local_experts=4, sliding_window=window)


PLUGIN_OF = {
    "Qwen2ForCausalLM": "qwen",
    "Qwen3ForCausalLM": "qwen",
    "Qwen3MoeForCausalLM": "qwen",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mistral",
}
CONFIGS = {
    "Qwen2ForCausalLM": qwen2_config,
    "Qwen3ForCausalLM": qwen3_config,
    "Qwen3MoeForCausalLM": qwen3_moe_config,
    "MistralForCausalLM": mistral_config,
    "MixtralForCausalLM": mixtral_config,
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: a second thread only adds the cost of waking it for every op,
    which grows to milliseconds per op when other processes keep the cores busy. The CPU
    platform keeps the thread count when ``OMP_NUM_THREADS`` is set."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if omp is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@dataclass
class Case:
    architecture: str
    path: Path
    prompt_ids: list[list[int]]
    reference: list[list[int]]


def tiny_model(architecture: str, window: int | None, path: Path) -> Path:
    config = CONFIGS[architecture](window)
    config.architectures = [architecture]
    return save_tiny_model(config, path)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    from transformers import PreTrainedTokenizerFast

    architecture = request.param
    path = tiny_model(architecture, WINDOW, tmp_path_factory.mktemp(architecture))
    # Not AutoTokenizer: for a qwen2 config it builds a Qwen2Tokenizer around the test's
    # word-level vocabulary, which splits the prompts into nonsense.
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    prompt_ids = [tok.encode(p) for p in TEST_PROMPTS]
    # One prompt of 4 windows, spanning two KV blocks before generation starts.
    prompt_ids[-1] = prompt_ids[2] + prompt_ids[6]
    assert sum(len(ids) > WINDOW for ids in prompt_ids) >= 3
    return Case(architecture, path, prompt_ids, hf_greedy(path, prompt_ids, NEW_TOKENS))


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", **kwargs)


def test_window_changes_hf_tokens(case: Case, tmp_path_factory) -> None:
    """Same weights without the window give other tokens: the reference depends on it."""
    path = tiny_model(case.architecture, None, tmp_path_factory.mktemp("no-window"))
    longest = sorted(range(len(case.prompt_ids)), key=lambda i: -len(case.prompt_ids[i]))[:2]
    unwindowed = hf_greedy(path, [case.prompt_ids[i] for i in longest], NEW_TOKENS)
    assert unwindowed != [case.reference[i] for i in longest]


def test_family_plugin_provides_it_and_disallowing_it_fails_clearly(case: Case, monkeypatch):
    assert get_plugins().get("models", case.architecture).plugin == PLUGIN_OF[case.architecture]
    monkeypatch.setenv("TESSELLM_PLUGINS", "platform_cpu,attention_torch,llama")
    try:
        get_plugins(refresh=True)
        with pytest.raises(ModelLoadError, match=f"no plugin provides model '{case.architecture}'"):
            make_llm(case.path)
    finally:
        monkeypatch.undo()
        get_plugins(refresh=True)


# -- the fused MoE layer on its own ----------------------------------------------------------


def moe_ctx(rank: int = 0, world_size: int = 1) -> ModelContext:
    return ModelContext(
        torch.float32, torch.device("cpu"), None, None, ParallelInfo(rank, world_size)
    )  # type: ignore[arg-type]  # attention and quantization are not used by MoE layers


def per_expert_weights(num_experts: int, hidden: int, inner: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    weights = {"mlp.gate.weight": torch.randn(num_experts, hidden)}
    for e in range(num_experts):
        weights[f"mlp.experts.{e}.gate_proj.weight"] = torch.randn(inner, hidden)
        weights[f"mlp.experts.{e}.up_proj.weight"] = torch.randn(inner, hidden)
        weights[f"mlp.experts.{e}.down_proj.weight"] = torch.randn(hidden, inner)
    return weights


def naive_moe(x: torch.Tensor, w: dict[str, torch.Tensor], top_k: int) -> torch.Tensor:
    """Token by token, expert by expert: the definition the fused layer must equal."""
    probs = torch.softmax(x @ w["mlp.gate.weight"].T, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], top_k)
        for p, e in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            gate = x[t] @ w[f"mlp.experts.{e}.gate_proj.weight"].T
            up = x[t] @ w[f"mlp.experts.{e}.up_proj.weight"].T
            down = w[f"mlp.experts.{e}.down_proj.weight"]
            out[t] += p * (torch.nn.functional.silu(gate) * up) @ down.T
    return out


class MoeHolder(torch.nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        self.mlp = SparseMoeBlock(16, 8, 4, 2, ctx, renormalize=False)


def test_fused_moe_equals_naive_and_loads_both_layouts() -> None:
    weights = per_expert_weights(4, 16, 8)
    rules = expert_weight_rules("gate_proj", "up_proj", "down_proj")
    per_expert = MoeHolder(moe_ctx())
    assert len(load_by_rules(per_expert, weights.items(), rules)) == 3
    stacked = {
        "mlp.gate.weight": weights["mlp.gate.weight"],
        "mlp.experts.gate_up_proj": torch.stack(
            [
                torch.cat([weights[f"mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up")])
                for e in range(4)
            ]
        ),
        "mlp.experts.down_proj": torch.stack(
            [weights[f"mlp.experts.{e}.down_proj.weight"] for e in range(4)]
        ),
    }
    fused = MoeHolder(moe_ctx())
    assert len(load_by_rules(fused, stacked.items(), rules)) == 3
    for name, param in per_expert.named_parameters():
        torch.testing.assert_close(param, fused.get_parameter(name), rtol=0, atol=0)
    x = torch.randn(11, 16)
    torch.testing.assert_close(per_expert.mlp(x), naive_moe(x, weights, 2))


def test_fused_experts_tensor_parallel_shards_sum_to_whole() -> None:
    weights = per_expert_weights(4, 16, 8)
    rules = expert_weight_rules("gate_proj", "up_proj", "down_proj")
    whole = MoeHolder(moe_ctx())
    load_by_rules(whole, weights.items(), rules)
    x = torch.randn(7, 16)
    route = torch.topk(torch.softmax(whole.mlp.gate(x), dim=-1), 2)
    partial_sum = torch.zeros_like(x)
    for rank in range(2):
        experts = FusedExperts(4, 16, 8, moe_ctx(rank, 2))
        holder = torch.nn.Module()
        holder.mlp = torch.nn.Module()
        holder.mlp.experts = experts
        load_by_rules(holder, weights.items(), rules)
        assert experts.gate_up_proj.shape == (4, 8, 16) and experts.down_proj.shape == (4, 16, 4)
        partial_sum += experts(x, route.values, route.indices)
    torch.testing.assert_close(partial_sum, whole.mlp.experts(x, route.values, route.indices))


@pytest.mark.parametrize("case", ["Qwen3MoeForCausalLM"], indirect=True)
def test_tensor_parallel_moe_matches_hf(case: Case) -> None:
    """Two ranks (mp over gloo), each with half of every expert's intermediate dim."""
    llm = make_llm(case.path, tensor_parallel_size=2)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in case.prompt_ids], GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == case.reference
    finally:
        llm.engine.shutdown()


def test_cuda_platform_skips_graphs_for_moe_models(caplog) -> None:
    """The experts' host-side row counts cannot be captured: no graph runner is built."""
    cuda_platform = pytest.importorskip("tessellm_cuda.platform")
    from tessellm.interfaces.platform import GraphSpec

    class CapturableAttention:
        name = "capturable"
        graph_capturable = True

    with caplog.at_level("INFO", logger=cuda_platform.__name__):
        runner = cuda_platform.CudaPlatform().graph_runner(
            MoeHolder(moe_ctx()), CapturableAttention(), GraphSpec(8, 64, 16)
        )
    assert runner is None
    assert "no CUDA graphs: FusedExperts cannot be captured" in caplog.text
