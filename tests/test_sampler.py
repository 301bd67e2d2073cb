"""Sampler: masks checked on probability vectors, penalties against their formula,
seeds independent of the batch, top_k=1 equals greedy, logprobs; one engine-level run."""

from __future__ import annotations

import math

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.engine.sampler import (
    Sampler,
    apply_penalties,
    compute_prompt_logprobs,
    mask_min_p_top_k_top_p,
)
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput

VOCAB = 32


def seq(params: SamplingParams, outputs=(), prompt=(), eos=frozenset(), request_id="r"):
    return ScheduledSeq(
        request_id=request_id,
        token_ids=[0],
        start_pos=0,
        block_ids=[0],
        sample=True,
        params=params,
        num_output_tokens=len(outputs),
        output_token_ids=list(outputs),
        prompt_token_ids=list(prompt),
        eos_token_ids=eos,
    )


def kept(probs: list[float], top_k=0, top_p=1.0, min_p=0.0) -> list[int]:
    """Indices that survive masking of a logit row built from ``probs``."""
    logits = torch.tensor([probs]).log()
    out = mask_min_p_top_k_top_p(
        logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])
    )
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


PROBS = [0.06, 0.5, 0.04, 0.3, 0.1]  # sorted: 0.5 (1), 0.3 (3), 0.1 (4), 0.06 (0), 0.04 (2)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    assert kept(PROBS, min_p=0.15) == [1, 3, 4]  # threshold 0.075
    assert kept(PROBS, min_p=0.61) == [1]  # threshold 0.305: even 0.3 goes
    assert kept(PROBS, min_p=0.0) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    assert kept(PROBS, top_p=0.75) == [1, 3]  # 0.5 alone falls short, 0.5 + 0.3 reaches it
    assert kept(PROBS, top_p=0.81) == [1, 3, 4]
    assert kept(PROBS, top_p=0.01) == [1]  # the top token always survives


def test_top_p_applies_to_what_top_k_left_renormalised():
    # After top-k=2 the mass is 0.625 / 0.375: the first alone reaches 0.6.
    assert kept([0.5, 0.3, 0.2], top_k=2, top_p=0.6) == [0]
    assert kept([0.5, 0.3, 0.2], top_k=2, top_p=0.7) == [0, 1]
    assert kept([0.5, 0.3, 0.2], top_k=2) == [0, 1]


def test_rows_without_masks_keep_every_token():
    # Peaked logits: a float32 cumsum reaches 1.0 long before the tail of the vocabulary.
    torch.manual_seed(0)
    logits = torch.randn(2, 50000) * 8
    out = mask_min_p_top_k_top_p(
        logits, torch.tensor([0, 5]), torch.tensor([1.0, 0.9]), torch.tensor([0.0, 0.0])
    )
    assert torch.isfinite(out[0]).all()
    assert int(torch.isfinite(out[1]).sum()) <= 5


def test_sampled_frequencies_follow_the_masked_distribution():
    rows = 6000
    logits = torch.tensor([PROBS] * rows).log()
    params = SamplingParams(temperature=1.0, top_p=0.81)
    tokens, _ = Sampler(seed=1)(logits, [seq(params)] * rows)
    counts = torch.bincount(torch.tensor(tokens), minlength=5).float() / rows
    assert counts[[0, 2]].sum() == 0  # outside the nucleus: never
    expected = torch.tensor([0.5, 0.3, 0.1]) / 0.9
    assert torch.allclose(counts[[1, 3, 4]], expected, atol=0.03)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([PROBS] * 4000).log()
    cold, _ = Sampler(seed=2)(logits, [seq(SamplingParams(temperature=0.25))] * 4000)
    hot, _ = Sampler(seed=2)(logits, [seq(SamplingParams(temperature=4.0))] * 4000)
    assert cold.count(1) / 4000 > 0.85  # p^4 renormalised: 0.5^4 / sum ≈ 0.88
    assert 0.2 < hot.count(1) / 4000 < 0.35


def test_top_k_1_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB)
    greedy, _ = Sampler()(logits, [seq(SamplingParams(temperature=0.0))] * 64)
    top1, _ = Sampler()(logits, [seq(SamplingParams(temperature=1.3, top_k=1))] * 64)
    assert top1 == greedy == logits.argmax(-1).tolist()


def test_seeded_row_is_independent_of_the_batch():
    torch.manual_seed(0)
    row = torch.randn(1, VOCAB)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = [Sampler(seed=0)(row, [seq(seeded, outputs=[5] * i)])[0][0] for i in range(20)]
    crowd_logits = torch.cat([torch.randn(3, VOCAB), row, torch.randn(4, VOCAB)])
    crowded = []
    for i in range(20):
        seqs = [seq(SamplingParams(temperature=1.0))] * 3 + [seq(seeded, outputs=[5] * i)]
        seqs += [seq(SamplingParams(temperature=0.7, seed=i))] * 4
        crowded.append(Sampler(seed=99)(crowd_logits, seqs)[0][3])
    assert alone == crowded
    assert len(set(alone)) > 3  # really sampling, not a constant
    other = [
        Sampler()(row, [seq(SamplingParams(seed=4321), outputs=[5] * i)])[0][0] for i in range(20)
    ]
    assert other != alone


def test_greedy_rows_stay_greedy_in_a_sampled_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, VOCAB)
    seqs = [seq(SamplingParams(temperature=0.0 if i % 2 else 2.0)) for i in range(8)]
    tokens, _ = Sampler()(logits, seqs)
    assert tokens[1::2] == logits.argmax(-1)[1::2].tolist()


def test_plain_greedy_bf16_batch_takes_the_argmax_of_the_fp32_logits():
    torch.manual_seed(0)
    logits = torch.randn(16, VOCAB).to(torch.bfloat16)
    plain = [seq(SamplingParams(temperature=0.0)) for _ in range(16)]
    # Ties (bf16 holds few distinct values): the first maximal index, as argmax gives.
    logits[0] = 0.0
    logits[0, 2] = logits[0, 7] = logits[0, VOCAB - 1] = 1.5
    tokens, logprobs = Sampler()(logits, plain)
    assert tokens == logits.float().argmax(-1).tolist()
    assert tokens[0] == 2
    assert logprobs is None
    # One penalised greedy row makes the whole batch take the full path: its top token,
    # ahead by 1.0, loses to the runner-up under a presence penalty of 2.0.
    logits[-1] = 0.0
    logits[-1, 3], logits[-1, 5] = 4.0, 3.0
    penalised = seq(SamplingParams(temperature=0.0, presence_penalty=2.0), outputs=[3])
    tokens, _ = Sampler()(logits, [*plain[:-1], penalised])
    assert tokens[-1] == 5
    assert tokens[:-1] == logits[:-1].float().argmax(-1).tolist()


def test_penalties_follow_the_documented_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # Output has token 1 twice and token 2 once; the prompt has token 3.
    out = apply_penalties(logits, [seq(params, outputs=[1, 1, 2], prompt=[3])])
    expected = [
        2.0,  # untouched
        -1.0 * 2.0 - 0.5 * 2 - 0.25,  # negative: times r; count 2
        0.5 / 2.0 - 0.5 * 1 - 0.25,  # positive: divided by r; count 1
        -0.5 * 2.0,  # prompt only: repetition penalty, no frequency/presence
        1.0,
    ]
    assert out[0].tolist() == pytest.approx(expected)


def test_penalties_are_per_row():
    logits = torch.zeros(2, 4) + 1.0
    plain = seq(SamplingParams())
    penalised = seq(SamplingParams(presence_penalty=1.0), outputs=[2])
    out = apply_penalties(logits, [plain, penalised])
    assert out[0].tolist() == [1.0] * 4
    assert out[1].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 5.0  # the EOS token would win
    biased = seq(SamplingParams(temperature=0.0, logit_bias={3: 10.0}))
    early = seq(
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9]),
        outputs=[1],
        eos=frozenset({7}),
    )
    logits[1, 9] = 4.0
    tokens, _ = Sampler()(logits, [biased, early])
    assert tokens[0] == 3
    assert tokens[1] not in (7, 9)
    done = seq(SamplingParams(temperature=0.0, min_tokens=1), outputs=[1], eos=frozenset({7}))
    assert Sampler()(logits[1:], [done])[0] == [7]


def test_logprobs_are_raw_with_rank_and_top_k():
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0.0),
    ]
    tokens, logprobs = Sampler()(logits, [seq(params[0], outputs=[0]), seq(params[1])])
    ref = logits.log_softmax(-1)
    chosen, rank, top = logprobs[0]
    assert logprobs[1] is None
    assert chosen == pytest.approx(ref[0, tokens[0]].item())
    assert rank == int((ref[0] > ref[0, tokens[0]]).sum()) + 1
    order = ref[0].argsort(descending=True)[:3].tolist()
    assert [t for t, _ in top] == order
    assert [lp for _, lp in top] == pytest.approx(ref[0, order].tolist())


def test_prompt_logprobs_score_the_next_prompt_token():
    hidden = torch.randn(5, VOCAB)
    chunk = seq(SamplingParams(prompt_logprobs=2), request_id="a")
    chunk.token_ids, chunk.start_pos = [11, 12, 13], 4
    chunk.prompt_logprob_token_ids = [12, 13]  # positions 4 and 5 score tokens 5 and 6
    other = seq(SamplingParams(), request_id="b")
    other.token_ids = [1, 2]
    plan = SchedulerOutput([other, chunk], 5)
    out = compute_prompt_logprobs(hidden, plan, lambda h: h)
    first, entries = out["a"]
    assert first == 5 and len(entries) == 2
    ref = hidden.log_softmax(-1)
    assert entries[0][0] == pytest.approx(ref[2, 12].item())
    assert entries[1][0] == pytest.approx(ref[3, 13].item())
    assert len(entries[1][2]) == 2
    assert compute_prompt_logprobs(hidden, SchedulerOutput([other], 2), lambda h: h) is None


def test_engine_seed_is_reproducible_in_any_batch(tiny_llama):
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    prompt = {"prompt_token_ids": [5, 9, 13, 17, 21, 25]}
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    crowd = [{"prompt_token_ids": [3 + i, 40, 41 + i]} for i in range(5)]
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([*crowd[:2], prompt, *crowd[2:]], [noise] * 2 + [seeded] + [noise] * 3)
    assert outs[2].outputs[0].token_ids == alone
    # n > 1 with a seed: sample i uses seed + i, so the first sample repeats the above.
    many = llm.generate(
        prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    )[0]
    assert many.outputs[0].token_ids == alone
    assert len({tuple(o.token_ids) for o in many.outputs}) == 3
    assert math.isfinite(llm.engine.stats()["prefix_cache_hit_rate"])


def test_bitmask_rows_of_one_buffer_are_read_in_place_and_others_copied():
    from tessellm.engine.sampler import _stacked_rows

    buffer = torch.arange(40, dtype=torch.int32).view(8, 5)
    consecutive = _stacked_rows(list(buffer[2:6].unbind(0)))
    assert consecutive.data_ptr() == buffer[2].data_ptr()
    assert torch.equal(consecutive, buffer[2:6])
    gapped = _stacked_rows([buffer[1], buffer[3]])
    assert gapped.data_ptr() != buffer[1].data_ptr()
    assert torch.equal(gapped, buffer[[1, 3]])
