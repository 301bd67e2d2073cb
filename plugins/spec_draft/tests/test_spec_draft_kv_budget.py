"""The KV budget is shared with the draft's cache: the pool gets ``t / (t + p)`` of it
(``t``, ``p``: the target's and the draft's bytes per block), so both caches fit; a
proposer without a cache (ngram) leaves the pool as it is."""

from __future__ import annotations

import os

from tessellm import LLM, SamplingParams

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per model


def make_llm(target, budget: int, spec: dict | None, **engine_args) -> LLM:
    return LLM(
        model=str(target),
        dtype="float32",
        device="cpu",
        download_dir=str(target.parent / "cache"),
        block_size=4,
        kv_cache_memory_bytes=budget,
        speculative_config=spec,
        **engine_args,
    )


def test_the_pool_and_the_drafts_cache_share_the_budget(tiny_model_factory):
    target = tiny_model_factory("LlamaForCausalLM")
    # One of the target's three layers: p = t / 3, a share of 3/4 for the pool.
    draft = tiny_model_factory("LlamaForCausalLM", seed=1, num_hidden_layers=1)
    alone = make_llm(target, 0, None, num_gpu_blocks_override=8)
    t = alone.engine.executor.runner.bytes_per_block()
    alone.engine.shutdown()
    budget = 90 * t + t // 2  # not a multiple of either block size: the floors count

    plain = make_llm(target, budget, None)
    try:
        assert plain.engine.num_blocks == 90
    finally:
        plain.engine.shutdown()

    llm = make_llm(target, budget, {"method": "draft_model", "model": str(draft)})
    try:
        engine = llm.engine
        p = engine.speculator.proposer.bytes_per_block()
        assert 0 < p < t
        assert 3 * p == t
        assert engine.num_blocks == budget // (t + p) == 67  # 90.5 * 3 / 4
        assert engine.num_blocks * (t + p) <= budget
        # The draft's cache holds the pool's blocks (and its scratch blocks after them).
        draft_cache = engine.speculator.proposer.draft.runner.num_blocks
        assert draft_cache >= engine.num_blocks
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": [5, 6, 7, 5, 6, 7]}], params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 6
    finally:
        llm.engine.shutdown()

    ngram = make_llm(target, budget, {"method": "ngram", "num_speculative_tokens": 2})
    try:
        assert ngram.engine.speculator.proposer.bytes_per_block() == 0
        assert ngram.engine.num_blocks == 90
    finally:
        ngram.engine.shutdown()
