"""The samples of an ``n > 1`` request forked from the one that computes the prompt
(``tessellm.engine.sample_fork``) for Mamba2 and Bamba: greedy and seeded tokens equal the
recompute path's (``supports_sample_forks`` off) and greedy equals transformers fp32; the
prompt is computed once; under preemption and with the schedule-ahead loop the tokens
are the same; every slot and KV block comes back."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from test_mamba_bamba import BAMBA
from test_mamba_parity import MAMBA2

from tessellm import LLM, SamplingParams
from tessellm.engine.cache_layout import build_layout
from tessellm.engine.hybrid_kv_cache_manager import HybridKVCacheManager
from tessellm.engine.sample_fork import SampleForks, _copy_rows
from tessellm.interfaces.cache_spec import FullAttentionSpec, RecurrentStateSpec
from tessellm.interfaces.request import Request
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput
from tessellm.testing import hf_greedy, tiny_model
from tessellm.testing.reference import encode_prompts

PROMPTS = [
    "the quick brown fox jumps over the lazy dog and runs far away into the woods",
    "hello",
    "one two three four five six seven eight nine ten",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            arch, config = {
                "mamba2": ("Mamba2ForCausalLM", MAMBA2),
                "bamba": ("BambaForCausalLM", BAMBA),
            }[name]
            path = tiny_model(arch, tmp_path_factory.mktemp(name) / "m", **config)
            prompt_ids = encode_prompts(path, PROMPTS)
            built[name] = path, prompt_ids, hf_greedy(path, prompt_ids, MAX_TOKENS)
        return built[name]

    return get


@pytest.fixture(params=["mamba2", "bamba"])
def model(request, models):
    return models(request.param)


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
    small = dict(
        max_num_batched_tokens=6,
        num_gpu_blocks_override=-(-longest // 4) + 6,
        enable_mixed_batches=True,  # the chunks beside decodes (the CPU's default runs them alone)
    )
    for ahead in (False, True):
        with engine(path, ahead=ahead, **small) as llm:
            got, stats = run(llm, prompt_ids, params)
            greedy, _ = run(llm, prompt_ids, GREEDY)
        assert got == want, f"ahead={ahead}"
        assert greedy == [[e] * 3 for e in expected], f"ahead={ahead}"
        assert stats["num_preemptions"] > 0
        # Some samples were forked: fewer prompt positions than every sample computing it.
        assert stats["num_computed_prompt_tokens"] < 2 * sum(len(p) for p in prompt_ids)


def test_forks_through_a_worker_process(models):
    """The fork seqs and the copies cross to an mp worker, which runs the model."""
    path, prompt_ids, expected = models("bamba")
    with engine(path, forks=False) as llm:
        want, _ = run(llm, prompt_ids, SEEDED)
    with engine(path, distributed_executor_backend="mp") as llm:
        assert type(llm.engine.executor).__name__ == "MultiprocExecutor"
        got, stats = run(llm, prompt_ids, SEEDED)
        greedy, _ = run(llm, prompt_ids, GREEDY)
    assert got == want
    assert greedy == [[e] * 3 for e in expected]
    assert stats["num_computed_prompt_tokens"] == sum(len(p) for p in prompt_ids)


def test_fork_shares_full_blocks_copies_the_partial_one_and_gives_all_back():
    layout = build_layout([RecurrentStateSpec(((4, 3),)), FullAttentionSpec()], num_state_slots=2)
    kv = HybridKVCacheManager(10, 4, True, layout=layout)
    leader = Request("r#0", list(range(10)), SamplingParams())
    sample = Request("r#1", list(range(10)), SamplingParams(), prompt_leader_id="r#0")
    kv.allocate(leader, 10)
    assert kv.fork(leader, sample)
    assert sample.block_ids[:2] == leader.block_ids[:2]  # full blocks: shared
    assert sample.block_ids[2] != leader.block_ids[2]  # the partial one: its own copy
    assert sample.state_slot not in (-1, leader.state_slot)
    third = Request("r#2", list(range(10)), SamplingParams(), prompt_leader_id="r#0")
    assert not kv.fork(leader, third)  # no slot left: it computes the prompt
    assert third.state_slot == -1 and not third.block_ids
    # The runner copies the slot and the differing page, and samples from the leader's row.
    seqs = [
        ScheduledSeq("x", [5], 3, [7], True, SamplingParams()),
        ScheduledSeq("r#0", list(range(10)), 0, leader.block_ids, True, SamplingParams()),
        ScheduledSeq("r#1", [], 10, sample.block_ids, True, SamplingParams()),
        ScheduledSeq("q#1", [], 4, [8], True, SamplingParams()),  # its leader is not here
    ]
    seqs[1].state_slot, seqs[2].state_slot = leader.state_slot, sample.state_slot
    seqs[2].fork_of, seqs[3].fork_of = "r#0", "q#0"
    forks = SampleForks.split(SchedulerOutput(seqs, 11))
    assert [s.request_id for s in forks.forward.seqs] == ["x", "r#0"]
    assert [s.request_id for s in forks.plan.seqs] == ["x", "r#0", "r#1"]
    assert forks.rows == [0, 1, 1]
    assert forks.state_copies == [(leader.state_slot, sample.state_slot)]
    assert forks.page_copies == [(leader.block_ids[2], sample.block_ids[2])]
    kv.free(leader)
    kv.free(sample)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks and len(kv.free_slots) == 2


def test_copies_read_every_source_before_writing_and_take_fp8_caches():
    for dtype in (torch.float32, torch.float8_e4m3fn):
        pages = torch.arange(8.0).view(4, 2).to(dtype)
        _copy_rows([pages], [(0, 1), (1, 2)], torch.device("cpu"))  # 1 is read, then written
        assert pages.float().tolist() == [[0, 1], [0, 1], [2, 3], [6, 7]]
