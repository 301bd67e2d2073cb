"""Structured outputs in the overlapped and schedule-ahead loops, through the test backend
of ``test_so_engine_fake``: the serial loop's outputs, a step failure caused by another
request (bisection re-runs parts of the plan, bitmasks included), and an abort while a
constrained request's step is in flight."""

from __future__ import annotations

import pytest
from test_so_engine_fake import CHOICES, _reset, choice, llm  # noqa: F401 - fixtures

from tessellm import SamplingParams
from tessellm.engine.step_recovery import FailedRequestOutput


def test_overlapped_loop_gives_the_serial_outputs(llm):  # noqa: F811 - the fixture
    engine = llm.engine
    prompts = ["Hello, my name is", "The capital of France is", "1 2 3"]
    params = [
        choice(temperature=0),
        choice(["yes", "no", "maybe"], temperature=1.0, seed=3, n=2),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    ]
    serial = [[(c.text, c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params)]
    for ahead in (False, True):
        engine.overlap_steps, engine.schedule_ahead = True, ahead
        try:
            outs = llm.generate(prompts, params)
            while engine.has_unfinished_requests():
                assert engine.step() == []
        finally:
            engine.overlap_steps = engine.schedule_ahead = False
        assert [[(c.text, c.token_ids) for c in o.outputs] for o in outs] == serial


@pytest.mark.parametrize("mode", ["serial", "overlap", "ahead"])
def test_a_step_failure_elsewhere_leaves_constrained_requests_valid(llm, monkeypatch, mode):  # noqa: F811 - the fixture
    """A request that breaks a step is found by re-running parts of the plan (bitmasks
    included) and fails alone; the constrained requests restart with their matchers."""
    from tessellm.engine.sampler import Sampler

    real = Sampler.sample

    def sample(self, logits, seqs):
        if any(s.params.seed == 666 and s.num_output_tokens >= 2 for s in seqs):
            raise IndexError("index 1000000000 is out of bounds")
        return real(self, logits, seqs)

    monkeypatch.setattr(Sampler, "sample", sample)
    engine = llm.engine
    engine.overlap_steps, engine.schedule_ahead = mode != "serial", mode == "ahead"
    try:
        engine.add_request("a", "A", choice(["yes", "no", "maybe"], temperature=0))
        engine.add_request("b", "The capital", choice(temperature=1.0, seed=4, n=2))
        engine.add_request("poison", "1 2", SamplingParams(seed=666, max_tokens=8))
        outs = {}
        while engine.has_unfinished_requests():
            outs.update((o.request_id, o) for o in engine.step())
    finally:
        engine.overlap_steps = engine.schedule_ahead = False
    assert isinstance(outs["poison"], FailedRequestOutput)
    assert outs["a"].outputs[0].text in ["yes", "no", "maybe"]
    assert all(c.text in CHOICES and c.finish_reason == "stop" for c in outs["b"].outputs)
    assert not engine.structured.matchers


def test_abort_of_a_constrained_request_in_flight(llm):  # noqa: F811 - the fixture
    engine = llm.engine
    engine.overlap_steps = True
    try:
        engine.add_request("drop", "A", choice(["maybe not", "perhaps"], temperature=0))
        engine.add_request("keep", "A", choice(temperature=0))
        engine.step()
        engine.step()
        assert engine._in_flight is not None
        engine.abort_request("drop")
        assert "drop" not in engine.structured.matchers
        outs = {}
        while engine.has_unfinished_requests():
            outs.update((o.request_id, o) for o in engine.step())
    finally:
        engine.overlap_steps = False
    assert outs["keep"].outputs[0].text in CHOICES and not engine.structured.matchers
