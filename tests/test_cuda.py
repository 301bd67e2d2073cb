"""The CUDA platform against HF transformers on the same GPU (skipped without one).

A tiny random Llama (head size 32, which the Triton backend serves) is generated greedily
by tessellm and by HF ``generate`` on the GPU: in fp32 the tokens must be equal, with and
without CUDA graphs; in bf16 every token tessellm picks must be among HF's five most
likely at that position (teacher-forced on tessellm's own continuation).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_PROMPTS, hf_continuation, save_tiny_model, tiny_llama_config

from tessellm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NEW_TOKENS = 24
# Different lengths, so the decode batch shrinks through padded graph sizes (8 -> 1).
MAX_TOKENS = [NEW_TOKENS - 3 * i for i in range(len(TEST_PROMPTS))]


@pytest.fixture(scope="module")
def gpu_llama(tmp_path_factory):
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    return save_tiny_model(config, tmp_path_factory.mktemp("gpu-llama"))


def tiny_qwen3_config():
    from transformers import Qwen3Config

    # Per-head q/k norms and a tied head; layers from 1 on see a window of 8 tokens.
    config = Qwen3Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    return config


@pytest.fixture(scope="module")
def gpu_qwen3(tmp_path_factory):
    pytest.importorskip("tessellm_qwen")
    return save_tiny_model(tiny_qwen3_config(), tmp_path_factory.mktemp("gpu-qwen3"))


@pytest.fixture(scope="module")
def prompt_ids(gpu_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpu_llama)
    return [tok.encode(p) for p in TEST_PROMPTS]


def hf_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


@torch.no_grad()
def hf_greedy_cuda(path, prompt_ids, dtype=torch.float32):
    model = hf_model(path, dtype)
    return [
        hf_continuation(model, ids, max_tokens)
        for ids, max_tokens in zip(prompt_ids, MAX_TOKENS, strict=True)
    ]


def generate(llm, prompt_ids):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
    return [o.outputs[0].token_ids for o in outs]


class ReplayCounter:
    """Wraps the runner's graph runner to count the steps it served."""

    def __init__(self, inner):
        self.inner = inner
        self.replays = 0

    def capture(self):
        self.inner.capture()

    def __call__(self, *args):
        hidden = self.inner(*args)
        self.replays += hidden is not None
        return hidden


def make_llm(path, dtype, **kwargs):
    llm = LLM(model=str(path), dtype=dtype, gpu_memory_utilization=0.3, max_num_seqs=16, **kwargs)
    runner = llm.engine.executor.runner
    assert runner.device.type == "cuda"
    assert runner.attention_choice.chosen == "triton"
    return llm, runner


def test_fp32_greedy_equals_hf_with_and_without_graphs(gpu_llama, prompt_ids):
    reference = hf_greedy_cuda(gpu_llama, prompt_ids)
    eager, runner = make_llm(gpu_llama, "float32", enforce_eager=True)
    assert runner.graph_runner is None
    assert generate(eager, prompt_ids) == reference
    del eager
    graphed, runner = make_llm(gpu_llama, "float32")
    assert runner.graph_runner is not None
    runner.graph_runner = counter = ReplayCounter(runner.graph_runner)
    assert generate(graphed, prompt_ids) == reference
    assert counter.replays >= NEW_TOKENS - 2  # decode steps were replayed, not run eagerly


def test_qwen3_with_windows_equals_hf_in_fp32(gpu_qwen3, prompt_ids, monkeypatch):
    """Windowed layers in a KV group of their own: the graphs carry each group's table."""
    reference = hf_greedy_cuda(gpu_qwen3, prompt_ids)
    llm, runner = make_llm(gpu_qwen3, "float32")
    assert len(runner.cache_layout.groups) > 1 and runner.graph_runner is not None
    replayed = []
    graph_step = type(runner.graph_runner).__call__

    def recording(self, *args):
        hidden = graph_step(self, *args)
        replayed.append(hidden is not None)
        return hidden

    monkeypatch.setattr(type(runner.graph_runner), "__call__", recording)
    assert generate(llm, prompt_ids) == reference
    assert any(replayed)


@torch.no_grad()
def test_bf16_tokens_are_in_hf_top5(gpu_llama, prompt_ids):
    llm, _ = make_llm(gpu_llama, "bfloat16")
    ours = generate(llm, prompt_ids)
    model = hf_model(gpu_llama, torch.bfloat16)
    for ids, generated in zip(prompt_ids, ours, strict=True):
        full = torch.tensor([ids + generated], device="cuda")
        logits = model(full).logits[0, len(ids) - 1 : -1].float()
        top5 = logits.topk(5, dim=-1).indices.tolist()
        misses = [i for i, tok in enumerate(generated) if tok not in top5[i]]
        assert not misses, f"tokens at {misses} are outside HF's top-5"


def test_graph_and_eager_steps_agree_in_bf16(gpu_llama, prompt_ids):
    eager, _ = make_llm(gpu_llama, "bfloat16", enforce_eager=True)
    graphed, runner = make_llm(gpu_llama, "bfloat16")
    assert runner.graph_runner is not None
    expected, got = generate(eager, prompt_ids), generate(graphed, prompt_ids)
    # Padding can change which GEMM kernel runs, so bf16 roundings may differ: allow the
    # rare late divergence but not a different continuation.
    same_prefix = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
        for x, y in zip(expected, got, strict=True)
    ]
    assert sum(same_prefix) >= 0.9 * sum(len(x) for x in expected)


def test_kv_cache_is_sized_from_free_memory(gpu_llama):
    _, runner = make_llm(gpu_llama, "bfloat16", enforce_eager=True)
    blocks_small = runner.available_blocks()
    runner.args.gpu_memory_utilization = 0.5
    blocks_large = runner.available_blocks()
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < blocks_small < blocks_large
    # Raising the utilisation by a fifth of the card gives about that much more to blocks.
    extra = (blocks_large - blocks_small) * runner.bytes_per_block()
    assert extra == pytest.approx(0.2 * total, rel=0.05)
