"""BambaForCausalLM (attention + Mamba2 layers: paged KV and recurrent-state slots from one
budget) against transformers' torch path in fp32: greedy tokens batched, one at a time,
under preemption, and with chunked prefill in blocks of 4."""

from __future__ import annotations

from transformers import AutoConfig

from tessellm import LLM
from tessellm.engine.hybrid_kv_cache_manager import HybridKVCacheManager
from tessellm.interfaces.cache_spec import FullAttentionSpec, RecurrentStateSpec
from tessellm.testing import assert_greedy_parity, tiny_model
from tessellm_mamba.bamba import BambaForCausalLM

BAMBA = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=4,
    attn_layer_indices=[1, 3],
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_chunk_size=8,
    mamba_d_conv=4,
)


def test_bamba_matches_hf(tmp_path):
    path = tiny_model("BambaForCausalLM", tmp_path / "bamba", **BAMBA)
    assert_greedy_parity(
        path, max_tokens=16, enforce_eager=True, modes=("batched", "one_at_a_time", "preemption")
    )


def test_bamba_chunked_prefill_uses_both_cache_kinds(tmp_path):
    path = tiny_model("BambaForCausalLM", tmp_path / "bamba", **BAMBA)
    specs = BambaForCausalLM.cache_specs(AutoConfig.from_pretrained(path))
    assert [type(s) for s in specs] == [
        RecurrentStateSpec,
        FullAttentionSpec,
        RecurrentStateSpec,
        FullAttentionSpec,
    ]
    assert_greedy_parity(
        path,
        max_tokens=16,
        enforce_eager=True,
        modes=("batched",),
        block_size=4,
        max_num_batched_tokens=8,
        max_num_seqs=4,
    )
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_num_seqs=3)
    try:
        kv = llm.engine.kv_cache_manager
        assert isinstance(kv, HybridKVCacheManager)
        assert kv.layout.has_state and kv.layout.num_state_slots == 3
        assert [g.layers for g in kv.layout.groups] == [(0, 1)]  # both attention layers
    finally:
        llm.engine.shutdown()
