"""Verification of speculative drafts, on synthetic logits: greedy keeps the drafts the
argmax agrees with; sampled rows follow the rejection rule, so the emitted tokens are
distributed exactly as the target's (chi-square over many draws); a seeded request gets
the tokens it gets without speculation, whatever its batch."""

from __future__ import annotations

import torch

from tessellm import SamplingParams
from tessellm.engine.sampler import Sampler
from tessellm.engine.spec_verify import verify_drafts
from tessellm.interfaces.schedule import ScheduledSeq

P0 = [0.05, 0.25, 0.3, 0.1, 0.2, 0.1]  # the target at the seq's last token
P1 = [0.4, 0.1, 0.1, 0.15, 0.05, 0.2]  # the target after draft 0 (token 2)
P2 = [0.1, 0.1, 0.1, 0.1, 0.5, 0.1]  # after drafts 0 and 1 (tokens 2, 4)
DRAFTS = [2, 4]
# Chi-square critical values at p = 0.001 (the test fails by chance once in a thousand runs
# at most; its draws are seeded, so a given torch build gives the same verdict each time).
CHI2_CRITICAL_5_DOF = 20.52


def spec_seq(params: SamplingParams, drafts=DRAFTS, request_id="r", outputs=3) -> ScheduledSeq:
    return ScheduledSeq(
        request_id=request_id,
        token_ids=[7, *drafts],
        start_pos=10,
        block_ids=[0],
        sample=True,
        params=params,
        num_output_tokens=outputs,
        draft_token_ids=list(drafts),
    )


def rows_for(count: int) -> torch.Tensor:
    """Logits for ``count`` seqs with the two drafts: rows P0, P1, P2 each."""
    one = torch.tensor([P0, P1, P2]).log()
    return one.repeat(count, 1)


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


def test_greedy_keeps_the_drafts_the_argmax_agrees_with():
    greedy = SamplingParams(temperature=0.0)
    logits = torch.tensor([P0, P1, P2]).log()  # argmaxes 2, 0, 4: draft 0 kept, draft 1 not
    result = verify_drafts(Sampler(), logits, [spec_seq(greedy)])
    assert result.num_accepted_drafts == [1]
    assert result.sampled_token_ids == [0]  # the target's own token where draft 1 failed
    all_agree = torch.tensor([P0, [0, 0, 0, 0, 1.0, 0], P2]).clamp_min(1e-9).log()
    result = verify_drafts(Sampler(), all_agree, [spec_seq(greedy)])
    assert result.num_accepted_drafts == [2] and result.sampled_token_ids == [4]


def test_sampled_tokens_follow_the_target_distribution():
    count = 20_000
    params = SamplingParams(temperature=1.0)
    seqs = [spec_seq(params, request_id=str(i)) for i in range(count)]
    result = verify_drafts(Sampler(seed=3), rows_for(count), seqs)
    assert result.num_accepted_drafts is not None
    emitted = [
        result.emitted_token_ids(i, s) for i, s in enumerate(seqs)
    ]  # accepted drafts, then the seq's own token
    first = [tokens[0] for tokens in emitted]
    first_counts = [first.count(t) for t in range(6)]
    assert chi_square(first_counts, P0) < CHI2_CRITICAL_5_DOF, first_counts
    # Given the first token was draft 0, the second is distributed as P1.
    second = [tokens[1] for tokens in emitted if tokens[0] == DRAFTS[0]]
    second_counts = [second.count(t) for t in range(6)]
    assert chi_square(second_counts, P1) < CHI2_CRITICAL_5_DOF, second_counts
    # Draft 0 is accepted with probability P0[2] = 0.3: within 4 standard deviations.
    rate = sum(n > 0 for n in result.num_accepted_drafts) / count
    assert abs(rate - P0[DRAFTS[0]]) < 4 * (0.3 * 0.7 / count) ** 0.5


def test_a_seeded_request_gets_the_tokens_it_gets_without_drafts():
    seeded = SamplingParams(temperature=1.0, seed=5)
    sampler = Sampler()
    for seed in range(40):
        params = SamplingParams(temperature=1.0, seed=seed)
        with_drafts = verify_drafts(sampler, rows_for(1), [spec_seq(params)])
        emitted = with_drafts.emitted_token_ids(0, spec_seq(params))
        # Without speculation: one step per position, the history growing by each token.
        plain = []
        for p, row in enumerate(torch.tensor([P0, P1, P2]).log()[: len(emitted)]):
            plain_seq = spec_seq(params, drafts=[])
            plain_seq.num_output_tokens += p
            plain.append(sampler.sample(row[None], [plain_seq])[0].item())
        assert emitted == plain, seed
    assert seeded.seed == 5


def test_a_seeded_request_verifies_the_same_whatever_its_batch():
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone = verify_drafts(Sampler(seed=0), rows_for(1), [spec_seq(seeded)])
    crowd = [spec_seq(SamplingParams(temperature=1.0), request_id=f"o{i}") for i in range(5)]
    together = verify_drafts(Sampler(seed=9), rows_for(6), [*crowd, spec_seq(seeded)])
    assert alone.emitted_token_ids(0, spec_seq(seeded)) == together.emitted_token_ids(
        5, spec_seq(seeded)
    )


def test_penalties_see_the_drafts_before_each_row():
    # Repetition penalty 100 on token 2: at row 1 (after draft 0 = token 2 was generated)
    # the penalised history must include it, so a greedy row 1 whose argmax is 2 moves off.
    params = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.0, 0.0, 0.0], P2])
    seq = spec_seq(params, drafts=[2, 3])
    seq.output_token_ids = [5]  # a request with penalties keeps its history
    result = verify_drafts(Sampler(), logits, [seq])
    # Row 0: token 2 unpenalised (not yet generated) -> draft 0 accepted; row 1: 2 is now
    # penalised to 0.05, so 3 wins -> draft 1 accepted; row 2 picks its argmax, 4.
    assert result.num_accepted_drafts == [2] and result.sampled_token_ids == [4]


def test_logprobs_of_every_emitted_token():
    params = SamplingParams(temperature=0.0, logprobs=1)
    logits = torch.tensor([P0, [0, 0, 0, 0, 1.0, 0], P2]).clamp_min(1e-9).log()
    result = verify_drafts(Sampler(), logits, [spec_seq(params)])
    assert result.draft_logprobs is not None and result.logprobs is not None
    drafts = result.draft_logprobs[0]
    assert drafts is not None and len(drafts) == 2
    assert abs(drafts[0][0] - torch.tensor(0.3).log().item()) < 1e-5  # draft 0 under P0
    assert abs(result.logprobs[0][0] - torch.tensor(0.5).log().item()) < 1e-5  # token 4, P2
