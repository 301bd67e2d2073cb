"""After start-up, serving compiles nothing: steps of every batch size, context length
and sampling mix run programs compiled during warm-up (torch-xla's own counters say
so), and each step updates the KV cache in place (its buffers aliased, not copied)."""

from __future__ import annotations

import pytest
from tpu_xla_support import XLA_ENGINE, compilations, require_xla

require_xla()

from tessellm import LLM, SamplingParams  # noqa: E402


@pytest.fixture
def llm(tiny_model_factory, tessellm_cache_dir):
    model = str(tiny_model_factory("LlamaForCausalLM"))
    engine = LLM(model=model, dtype="float32", download_dir=str(tessellm_cache_dir), **XLA_ENGINE)
    yield engine
    engine.engine.shutdown()


def prompts(count: int, length: int) -> list[dict]:
    return [
        {"prompt_token_ids": [3 + (i * 7 + j) % 200 for j in range(length + i)]}
        for i in range(count)
    ]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# (prompts, sampling): batch sizes 1 to 8, prompts of 3 to 150 tokens (contexts on both
# sides of 128), greedy, random (top-k/top-p/min-p) and host-sampled (logprobs, seed).
WORKLOAD = [
    (prompts(1, 3), GREEDY),
    (prompts(8, 9), GREEDY),
    (prompts(3, 40), SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=12)),
    (prompts(2, 140), GREEDY),
    (prompts(5, 20), SamplingParams(temperature=0.7, min_p=0.05, max_tokens=30)),
    (prompts(2, 10), SamplingParams(temperature=0.0, logprobs=2, max_tokens=5)),
    (prompts(2, 10), SamplingParams(temperature=1.0, seed=7, max_tokens=5)),
]


def test_no_compilation_after_warm_up(llm):
    import torch_xla.debug.metrics as met

    runner = llm.engine.executor.runner.step_runner
    warm = compilations()
    for batch, params in WORKLOAD:
        outputs = llm.generate(batch, params)
        assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outputs)
        assert all(0 <= t < 256 for o in outputs for t in o.outputs[0].token_ids)
    assert compilations() == warm, met.short_metrics_report()
    # The workload reached every token bucket, both context buckets and both kinds.
    shapes = {shape for shape, _ in runner.shapes_run}
    assert {s.tokens for s in shapes} == set(runner.buckets.token_buckets)
    assert {s.blocks for s in shapes} == set(runner.buckets.context_buckets)
    assert {kind for _, kind in runner.shapes_run} == {"greedy", "random"}


def test_the_kv_cache_is_updated_in_place(llm):
    import torch_xla

    caches = [layer.k_cache for layer in llm.engine.executor.runner.attn_layers]
    buffers = [torch_xla._XLAC._unsafe_buffer_pointer(kv) for kv in caches]
    # The scheduler's blocks (the last is scratch: warm-up wrote its padding there).
    assert all(float(kv.cpu()[:-1].abs().sum()) == 0 for kv in caches)
    llm.generate(prompts(3, 20), GREEDY)
    # Written, yet each layer's cache is still the buffer it was: each step's program
    # aliased it to its updated value instead of allocating a new cache.
    assert all(float(kv.cpu()[:-1].abs().sum()) > 0 for kv in caches)
    assert [torch_xla._XLAC._unsafe_buffer_pointer(kv) for kv in caches] == buffers


def test_a_seeded_request_gets_the_same_tokens_in_any_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=8)
    alone = llm.generate(prompts(1, 6), seeded)[0].outputs[0].token_ids
    with_others = llm.generate(prompts(3, 6), seeded)[0].outputs[0].token_ids
    assert alone == with_others
