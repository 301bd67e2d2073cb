"""Fault isolation on the host side of a step: a request whose result cannot be applied by
the scheduler (``update``/``fill``) or whose tokens cannot be detokenized fails alone, in
the serial, overlapped and schedule-ahead loops; the others get the tokens and text they
get without it. An exception from ``schedule()`` is not attributable and stops the engine."""

from __future__ import annotations

import pytest
from conftest import run_to_end

from tessellm.config import EngineArgs
from tessellm.engine import output_processor
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.scheduler import Scheduler
from tessellm.engine.step_recovery import FailedRequestOutput, RequestFailedError
from tessellm.errors import InvalidRequestError
from tessellm.outputs import RequestOutput
from tessellm.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 5, 9, 11], [1, 6, 9, 11, 13], [2, 7], [1, 5, 9, 11, 40, 41, 42]]
BAD_PROMPT = [1, 2, 3]
BAD_SEED = 4242
MODES = ["serial", "overlap", "ahead"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    args = EngineArgs(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=8)
    llm_engine = LLMEngine(args)
    yield llm_engine
    llm_engine.shutdown()


@pytest.fixture(scope="module")
def reference(engine):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", prompt, GREEDY)
    finals = run_to_end(engine)
    return [finals[f"ref{i}"].outputs[0] for i in range(len(PROMPTS))]


@pytest.fixture(params=MODES)
def mode(request, engine):
    # On the CPU the launch runs at once, but the engine follows the overlapped order.
    engine.overlap_steps = request.param in ("overlap", "ahead")
    engine.schedule_ahead = request.param == "ahead"
    yield request.param
    engine.overlap_steps = engine.schedule_ahead = False


def run_with_bad(engine: LLMEngine, bad_params: SamplingParams) -> dict[str, RequestOutput]:
    """The reference prompts with a bad request joining after two steps: all finals."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ok{i}", prompt, GREEDY)
    early = [out for _ in range(2) for out in engine.step()]
    assert not any(isinstance(out, FailedRequestOutput) for out in early)
    engine.add_request("bad", BAD_PROMPT, bad_params)
    return run_to_end(engine)


def assert_others_unharmed(engine: LLMEngine, finals, reference) -> None:
    got = [finals[f"ok{i}"] for i in range(len(PROMPTS))]
    assert not any(isinstance(out, FailedRequestOutput) for out in got)
    assert [o.outputs[0].token_ids for o in got] == [c.token_ids for c in reference]
    assert [o.outputs[0].text for o in got] == [c.text for c in reference]
    assert engine.kv_cache_manager.usage() == 0.0
    assert engine.stats()["num_running"] == engine.stats()["num_waiting"] == 0
    assert not engine.output_processor.parents
    engine.add_request("after", PROMPTS[0], GREEDY)  # the engine goes on
    assert run_to_end(engine)["after"].outputs[0].token_ids == reference[0].token_ids


class BrokenDetokenizer:
    """Decodes like the real one, then raises on the request's third token."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.added = 0

    @property
    def text(self) -> str:
        return self.inner.text

    def add(self, token_id: int) -> str:
        self.added += 1
        if self.added == 3:
            raise ValueError(f"cannot decode token {token_id}")
        return self.inner.add(token_id)


def test_a_request_that_cannot_be_detokenized_fails_alone(engine, reference, mode, monkeypatch):
    real = output_processor.make_detokenizer

    def make(tokenizer, prompt_ids, *args):
        detok = real(tokenizer, prompt_ids, *args)
        return BrokenDetokenizer(detok) if list(prompt_ids) == BAD_PROMPT else detok

    monkeypatch.setattr(output_processor, "make_detokenizer", make)
    finals = run_with_bad(engine, SamplingParams(temperature=0, max_tokens=5, n=2))
    bad = finals.pop("bad")
    assert isinstance(bad, FailedRequestOutput) and bad.finished
    assert isinstance(bad.error, RequestFailedError)
    assert "ValueError: cannot decode token" in str(bad.error)
    assert [c.finish_reason for c in bad.outputs] == ["abort", "abort"]
    assert_others_unharmed(engine, finals, reference)


@pytest.fixture
def broken_stop_check(monkeypatch):
    real = Scheduler._check_stop

    def check_stop(self, request, token):
        if request.params.seed == BAD_SEED and len(request.output_token_ids) == 2:
            raise KeyError(token)
        return real(self, request, token)

    monkeypatch.setattr(Scheduler, "_check_stop", check_stop)


def test_a_request_the_scheduler_cannot_update_fails_alone(
    engine, reference, mode, broken_stop_check
):
    finals = run_with_bad(engine, SamplingParams(temperature=0, seed=BAD_SEED, max_tokens=5))
    bad = finals.pop("bad")
    assert isinstance(bad, FailedRequestOutput) and bad.finished
    assert isinstance(bad.error, RequestFailedError) and "KeyError" in str(bad.error)
    assert len(bad.outputs[0].token_ids) == 1  # the token it failed on never reached it
    assert_others_unharmed(engine, finals, reference)


def test_an_update_failure_that_validation_explains_is_a_client_error(engine, reference):
    params = SamplingParams(temperature=0, max_tokens=5)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ok{i}", prompt, GREEDY)
    engine.add_request("bad", BAD_PROMPT, params)
    engine.step()
    params.max_tokens = "5"  # only the stop check reads it: it raises TypeError there
    finals = run_to_end(engine)
    bad = finals.pop("bad")
    assert isinstance(bad, FailedRequestOutput)
    assert isinstance(bad.error, InvalidRequestError) and "max_tokens" in str(bad.error)
    assert_others_unharmed(engine, finals, reference)


def test_a_scheduler_that_raises_in_schedule_stops_the_engine(engine, monkeypatch):
    def schedule(self):
        raise AssertionError("the scheduler's books do not balance")

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    engine.add_request("victim", PROMPTS[0], GREEDY)
    with pytest.raises(AssertionError, match="books"):
        engine.step()
    monkeypatch.undo()
    engine.abort_request("victim")
    run_to_end(engine)
    assert engine.kv_cache_manager.usage() == 0.0
