"""Windowed layers hold only their window's blocks, end to end: Gemma 3 (windowed layers in
their own KV groups) and Mistral (every layer windowed: the one table frees), greedy
tokens equal to HF's while blocks are freed and reused, with prefix hits and preemption."""

from __future__ import annotations

from tessellm import LLM, SamplingParams
from tessellm.engine.cache_layout import window_blocks
from tessellm.engine.hybrid_kv_cache_manager import HybridKVCacheManager
from tessellm.testing import assert_greedy_parity, tiny_model

WINDOW, BLOCK = 8, 4
GEMMA3 = dict(
    num_hidden_layers=4,
    head_dim=16,
    sliding_window=WINDOW,
    max_position_embeddings=256,
    layer_types=["sliding_attention", "full_attention"] * 2,
)


def test_gemma3_windowed_groups_match_hf(tmp_path):
    path = tiny_model("Gemma3ForCausalLM", tmp_path / "g3", **GEMMA3)
    assert_greedy_parity(path, max_tokens=32, block_size=BLOCK, enforce_eager=True)


def test_mistral_one_windowed_table_matches_hf(tmp_path):
    path = tiny_model("MistralForCausalLM", tmp_path / "m", sliding_window=WINDOW)
    assert_greedy_parity(
        path,
        max_tokens=32,
        block_size=BLOCK,
        enforce_eager=True,
        modes=("batched", "prefix_cache", "preemption"),
    )


def test_running_requests_hold_only_the_window(tmp_path):
    path = tiny_model("Gemma3ForCausalLM", tmp_path / "g3", **GEMMA3)
    llm = LLM(model=str(path), dtype="float32", block_size=BLOCK, enforce_eager=True)
    engine = llm.engine
    try:
        kv = engine.kv_cache_manager
        assert isinstance(kv, HybridKVCacheManager) and len(kv.layout.groups) == 2
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        for i in range(3):
            engine.add_request(f"r{i}", list(range(5, 15 + i)), params)
        most_full = most_windowed = 0
        while engine.has_unfinished_requests():
            engine.step()
            for request in engine.scheduler.running:
                windowed = [b for b in request.group_block_ids[0] if b != kv.null_block]
                most_windowed = max(most_windowed, len(windowed))
                most_full = max(most_full, len(request.block_ids))
        assert most_windowed <= window_blocks(WINDOW, BLOCK)
        # The full group keeps every position (12-token prompt, 40 tokens, the last unwritten).
        assert most_full >= -(-(12 + 38) // BLOCK)
        assert kv.num_free_blocks == kv.pool.num_blocks  # all returned
    finally:
        engine.shutdown()
