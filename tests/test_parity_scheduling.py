"""Greedy parity with HF transformers survives chunked prefill, prefix-cache hits,
preemption and parallel sampling; the engine's counters show each mechanism at work."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_greedy

from tessellm import LLM, SamplingParams

NEW_TOKENS = 16


def greedy(max_tokens: int = NEW_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def make_llm(path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", **kwargs)


def token_prompts(lengths: list[int], seed: int, prefix: list[int] | None = None):
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, 256) for _ in range(n)] for n in lengths]


def generate_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


LONG = token_prompts([70, 23, 41, 9], seed=1)
SYSTEM = token_prompts([40], seed=2)[0]
SHARED = token_prompts([5, 9, 7], seed=3, prefix=SYSTEM)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    prompts = [*LONG, *SHARED]
    return dict(zip(map(tuple, prompts), hf_greedy(tiny_llama, prompts, NEW_TOKENS), strict=True))


def test_chunked_prefill_at_a_small_budget(tiny_llama, reference):
    llm = make_llm(tiny_llama, max_num_batched_tokens=16)
    assert generate_ids(llm, LONG, greedy()) == [reference[tuple(p)] for p in LONG]
    stats = llm.engine.stats()
    assert stats["computed_tokens"] <= 16 * stats["steps"]
    # 143 prompt tokens at 16 a step: prefill alone needs 9 steps; decodes rode along.
    assert stats["steps"] < 9 + NEW_TOKENS + 4


def test_prefix_hits_sent_together(tiny_llama, reference):
    llm = make_llm(tiny_llama, block_size=8)
    assert generate_ids(llm, SHARED, greedy()) == [reference[tuple(p)] for p in SHARED]
    # The first prompt computes the 40-token system prompt, the others take its 5 blocks.
    assert llm.engine.stats()["prefix_cache_hit_tokens"] == 2 * 40


def test_prefix_hits_one_after_another(tiny_llama, reference):
    llm = make_llm(tiny_llama, block_size=8, max_num_batched_tokens=16)
    cached = []
    for prompt in SHARED:
        out = llm.generate({"prompt_token_ids": prompt}, greedy())[0]
        assert out.outputs[0].token_ids == reference[tuple(prompt)]
        cached.append(out.num_cached_tokens)
    assert cached == [0, 40, 40]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_forced_preemption(tiny_llama, reference, enable_prefix_caching):
    # 15 blocks of 4 tokens: requests growing to 39, 25 and 57 tokens cannot run together.
    prompts = [LONG[1], LONG[3], LONG[2]]
    llm = make_llm(
        tiny_llama,
        block_size=4,
        num_gpu_blocks_override=15,
        enable_prefix_caching=enable_prefix_caching,
    )
    assert generate_ids(llm, prompts, greedy()) == [reference[tuple(p)] for p in prompts]
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_cache_usage"] == 0.0 and stats["num_running"] == stats["num_waiting"] == 0


def test_parallel_sampling_computes_the_prompt_once(tiny_llama, reference):
    prompt = LONG[2]  # 41 tokens, block size 16: 32 shareable, a 9-token tail per sample
    llm = make_llm(tiny_llama)
    out = llm.generate({"prompt_token_ids": prompt}, greedy(n=3))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(o.token_ids == reference[tuple(prompt)] for o in out.outputs)
    stats = llm.engine.stats()
    assert stats["num_computed_prompt_tokens"] == 41 + 2 * 9
    assert stats["prefix_cache_hit_tokens"] == 2 * 32


def test_prefix_heavy_run_reports_a_high_hit_rate(tiny_llama):
    system = token_prompts([96], seed=4)[0]
    prompts = token_prompts([3, 4, 5, 6] * 3, seed=5, prefix=system)
    llm = make_llm(tiny_llama)
    outs = generate_ids(llm, prompts, greedy(max_tokens=4))
    assert outs == hf_greedy(tiny_llama, prompts[:2], 4) + outs[2:]
    stats = llm.engine.stats()
    received = sum(map(len, prompts))
    assert stats["prompt_tokens"] == received
    assert stats["prefix_cache_hit_rate"] > 0.8
    assert stats["num_computed_prompt_tokens"] < 0.2 * received
    assert stats["computed_tokens"] < received


def test_prompt_logprobs_match_hf_across_chunks(tiny_llama):
    from transformers import AutoModelForCausalLM

    prompt = LONG[0]
    llm = make_llm(tiny_llama, max_num_batched_tokens=16)
    params = greedy(max_tokens=2, prompt_logprobs=2, logprobs=3)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    for pos in range(1, len(prompt)):
        entry = lps[pos]
        token = prompt[pos]
        assert entry[token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
        assert entry[token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
        top = ref[pos - 1].topk(2).indices.tolist()
        assert [t for t, lp in entry.items() if lp.rank in (1, 2)] == top
    # The first generated token is scored by the last prompt position: greedy, so rank 1.
    first = out.outputs[0].logprobs[0]
    token = out.outputs[0].token_ids[0]
    assert list(first) == ref[-1].topk(3).indices.tolist() and first[token].rank == 1
    assert first[token].logprob == pytest.approx(ref[-1, token].item(), abs=1e-4)
    comp = out.outputs[0]
    scored = zip(comp.logprobs, comp.token_ids, strict=True)
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in scored))


def test_priority_policy_runs_the_most_urgent_first(tiny_llama, reference):
    prompts = [LONG[1], LONG[3], SHARED[0]]
    llm = make_llm(tiny_llama, scheduling_policy="priority", max_num_seqs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), priority=[5, 0, 1])
    assert [o.outputs[0].token_ids for o in outs] == [reference[tuple(p)] for p in prompts]
    # One sequence at a time: priority 0 first, then 1, then 5.
    ttft = [o.metrics["time_to_first_token"] for o in outs]
    assert ttft[1] < ttft[2] < ttft[0]


@pytest.mark.parametrize("mixed", [False, True])
def test_arrivals_between_steps_mixed_or_not(tiny_llama, reference, mixed):
    # Requests join while others decode and a prompt is chunked (budget 16): with mixed
    # batches their prompts share steps with the decodes, without they run alone first.
    llm = make_llm(tiny_llama, max_num_batched_tokens=16, enable_mixed_batches=mixed)
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    prompts = {f"r{i}": p for i, p in enumerate(LONG)}
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, greedy())
        for _ in range(3):
            for out in engine.step():
                tokens[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = out.outputs[0].token_ids
    assert [tokens[r] for r in prompts] == [reference[tuple(p)] for p in LONG]
    decoding = [{s.num_output_tokens > 0 for s in plan.seqs} for plan in plans]
    assert any(len(kinds) == 2 for kinds in decoding) is mixed
