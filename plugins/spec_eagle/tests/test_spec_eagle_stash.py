"""The EAGLE proposer's stash of the target's hidden states: rows past a rejected draft are
not the target's states; past its cap the requests updated longest ago lose their rows,
and a request whose rows were lost (speculation paused) still gets the target's outputs."""

from __future__ import annotations

import os

import numpy as np
import torch

from tessellm import LLM, SamplingParams
from tessellm.interfaces.request import Request
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput
from tessellm_spec_eagle.checkpoint import save_random_eagle_head
from tessellm_spec_eagle.stash import HiddenStash, fill_rows

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per model

GREEDY = SamplingParams(temperature=0.0)


def seq(request_id: str, tokens: list[int], start: int) -> ScheduledSeq:
    return ScheduledSeq(request_id, tokens, start, [0], True, GREEDY)


def test_rows_past_a_rejected_draft_are_dropped():
    stash = HiddenStash(max_rows=100)
    # The prompt (positions 0-2), which sampled 13; then a verification step: 13 at
    # position 3 and drafts 20, 21, of which the target kept 20 and then chose 30.
    stash(SchedulerOutput([seq("a", [10, 11, 12], 0)], 3), torch.arange(3.0)[:, None])
    stash(SchedulerOutput([seq("a", [13, 20, 21], 3)], 3), 10 + torch.arange(3.0)[:, None])
    request = Request("a", [10, 11, 12], GREEDY)
    request.output_token_ids = [13, 20, 30]
    out = torch.full((5, 1), -1.0)  # the known states: positions 0-4
    filled = np.zeros(5, dtype=bool)
    fill_rows(out, filled, 0, stash.take("a"), request)
    assert out[:, 0].tolist() == [0, 1, 2, 10, 11]  # position 5's input, 21, was rejected
    assert filled.all()
    # Had the target rejected 20 (and chosen 25): only position 3's row is its state.
    request.output_token_ids = [13, 25, 30]
    stash(SchedulerOutput([seq("a", [13, 20, 21], 3)], 3), 10 + torch.arange(3.0)[:, None])
    out, filled = torch.zeros((3, 1)), np.zeros(3, dtype=bool)
    fill_rows(out, filled, 2, stash.take("a"), request)
    assert filled.tolist() == [False, True, False]
    assert out[1, 0] == 10
    assert stash.num_rows == 0


def test_past_the_cap_the_oldest_requests_lose_their_rows():
    stash = HiddenStash(max_rows=6)
    stash(SchedulerOutput([seq("a", [1, 2, 3], 0), seq("b", [4, 5], 0)], 5), torch.zeros(5, 1))
    stash(SchedulerOutput([seq("b", [6], 2), seq("c", [7, 8], 0)], 3), torch.zeros(3, 1))
    assert stash.num_rows == 5  # "a" (updated longest ago) went
    assert stash.num_dropped == 1
    assert stash.take("a") == []
    assert [len(c.token_ids) for c in stash.take("b")] == [2, 1]
    assert stash.num_rows == 2


def test_outputs_hold_when_rows_are_lost_while_speculation_pauses(tiny_model_factory, tmp_path):
    target = tiny_model_factory("LlamaForCausalLM")
    head = save_random_eagle_head(target, tmp_path / "head")
    prompts = [[5, 17, 33, 8, 41] * 3, list(range(40, 63)), [90, 91, 92, 93] * 2 + [7]]
    # The first to finish lets speculation resume (no drafts while more than 2 run).
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for n in (6, 20, 14)]

    def run(spec: dict | None) -> tuple[list[list[int]], dict]:
        llm = LLM(
            model=str(target),
            dtype="float32",
            device="cpu",
            download_dir=str(tmp_path / "cache"),
            speculative_config=spec,
        )
        try:
            if spec is not None:  # a tiny cap: rows are dropped while three requests run
                llm.engine.speculator.proposer.stash.max_rows = 4
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
            stats = llm.engine.stats()
            if spec is not None:
                stats["dropped"] = llm.engine.speculator.proposer.stash.num_dropped
            return [list(o.outputs[0].token_ids) for o in outs], stats
        finally:
            llm.engine.shutdown()

    expected, _ = run(None)
    got, stats = run({"method": "eagle", "model": str(head), "disable_by_batch_size": 2})
    assert got == expected
    assert stats["dropped"] > 0
    assert stats["spec_decode_num_draft_tokens"] > 0
