"""The samples of an ``n > 1`` request forked from the one that computes the prompt
(``tessellm.engine.sample_fork``) for Mamba2 and Bamba: greedy and seeded tokens equal the
recompute path's (``supports_sample_forks`` off) and greedy equals transformers fp32; the
prompt is computed once; under preemption and with the schedule-ahead loop the tokens
are the same; every slot and KV block comes back."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tessellm import LLM, SamplingParams
from tessellm.testing import hf_greedy, tiny_model
from tessellm.testing.reference import encode_prompts

MAMBA2 = dict(
    hidden_size=64,
    expand=2,
    num_heads=8,
    head_dim=16,
    n_groups=2,
    state_size=16,
    conv_kernel=4,
    chunk_size=8,
    num_hidden_layers=2,
)
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
PROMPTS = [
    "the quick brown fox jumps over the lazy dog and runs far away into the woods",
    "hello",
    "one two three four five six seven eight nine ten",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=["mamba2", "bamba"])
def model(request, tmp_path_factory):
    arch, config = {
        "mamba2": ("Mamba2ForCausalLM", MAMBA2),
        "bamba": ("BambaForCausalLM", BAMBA),
    }[request.param]
    path = tiny_model(arch, tmp_path_factory.mktemp(request.param) / "m", **config)
    prompt_ids = encode_prompts(path, PROMPTS)
    return path, prompt_ids, hf_greedy(path, prompt_ids, MAX_TOKENS)


@contextmanager
def engine(path, forks: bool = True, ahead: bool = False, **overrides):
    # Blocks of 4: Bamba's prompts end inside a block (copied) and on a boundary (shared).
    kwargs = dict(dtype="float32", enforce_eager=True, block_size=4, max_num_seqs=9)
    llm = LLM(model=str(path), **{**kwargs, **overrides})
    eng = llm.engine
    eng.kv_cache_manager.supports_sample_forks = forks
    if ahead:  # the schedule-ahead loop, which a CPU executor does not choose itself
        eng.overlap_steps = eng.schedule_ahead = True
    try:
        yield llm
        kv = eng.kv_cache_manager
        assert not eng.has_unfinished_requests()
        assert kv.pool.num_free_blocks == kv.pool.num_blocks  # shared blocks all came back
        assert sorted(kv.free_slots) == list(range(kv.layout.num_state_slots))
    finally:
        eng.shutdown()


def run(llm, prompt_ids, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
    while llm.engine.has_unfinished_requests():  # the schedule-ahead loop's last step
        assert llm.engine.step() == []
    stats = llm.engine.stats()
    return [[list(o.token_ids) for o in out.outputs] for out in outs], stats


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
SEEDED = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3, seed=7)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_forks_match_recompute_and_compute_the_prompt_once(model, params):
    path, prompt_ids, expected = model
    with engine(path, forks=False) as llm:
        recomputed, old = run(llm, prompt_ids, params)
    with engine(path) as llm:
        forked, new = run(llm, prompt_ids, params)
    assert forked == recomputed
    if params.temperature == 0:
        assert forked == [[want] * 3 for want in expected]
    else:  # seeded samples differ from one another (each has its own seed)
        assert any(len({tuple(t) for t in sample}) > 1 for sample in forked)
    total = sum(len(p) for p in prompt_ids)
    assert old["num_computed_prompt_tokens"] == 3 * total
    assert new["num_computed_prompt_tokens"] == total


def test_forks_under_chunked_prefill_preemption_and_schedule_ahead(model):
    path, prompt_ids, expected = model
    params = SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, ignore_eos=True, n=2, seed=3)
    with engine(path, forks=False) as llm:
        want, _ = run(llm, prompt_ids, params)
    # Chunks of 6 tokens beside decodes, the schedule-ahead loop's placeholders, and a
    # pool too small for every sample at full length: samples are preempted (they
    # recompute) and resume with the same tokens.
    longest = max(len(p) for p in prompt_ids) + MAX_TOKENS
    small = dict(max_num_batched_tokens=6, num_gpu_blocks_override=-(-longest // 4) + 6)
    for ahead in (False, True):
        with engine(path, ahead=ahead, **small) as llm:
            got, stats = run(llm, prompt_ids, params)
            greedy, _ = run(llm, prompt_ids, GREEDY)
        assert got == want, f"ahead={ahead}"
        assert greedy == [[e] * 3 for e in expected], f"ahead={ahead}"
        assert stats["num_preemptions"] > 0
        # Some samples were forked: fewer prompt positions than every sample computing it.
        assert stats["num_computed_prompt_tokens"] < 2 * sum(len(p) for p in prompt_ids)
