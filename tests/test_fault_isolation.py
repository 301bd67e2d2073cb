"""One bad request never stops the engine: bounds at the API edge and in SamplingParams,
a step that raises fails only the request(s) that caused it, and only a failure no request
is to blame for (a worker died, the device is lost) stops the engine."""

from __future__ import annotations

import asyncio

import pytest
from conftest import run_to_end

from tessellm.config import EngineArgs
from tessellm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.sampler import Sampler, apply_min_tokens
from tessellm.engine.step_recovery import FailedRequestOutput, RequestFailedError
from tessellm.errors import InvalidRequestError, WorkerError
from tessellm.interfaces.schedule import ScheduledSeq
from tessellm.outputs import CompletionOutput, RequestOutput
from tessellm.sampling_params import SamplingParams

POISON_SEED = 666  # the monkeypatched sampler raises for a batch holding this seed
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 5, 9, 11], [1, 6, 9, 11, 13], [2, 7], [1, 5, 9, 11, 40, 41, 42]]


# -- SamplingParams and the engine's own checks -------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 10**20}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"stop_token_ids": [10**20]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {10**20: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"presence_penalty": float("-inf")}, "presence_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"n": 10**9}, "n"),
        ({"max_tokens": 10**20}, "max_tokens"),
        ({"min_tokens": 10**20, "max_tokens": None}, "min_tokens"),
        ({"logprobs": 10**20}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"n": True}, "n"),
        ({"temperature": "1"}, "temperature"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_sampling_params_bound_every_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_numbers():
    np = pytest.importorskip("numpy")
    params = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), top_k=-1, seed=2**63 - 1)
    assert (type(params.n), type(params.temperature), params.top_k) == (int, float, 0)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    args = EngineArgs(model=str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=8)
    llm_engine = LLMEngine(args)
    yield llm_engine
    llm_engine.shutdown()


@pytest.mark.parametrize(
    ("prompt", "kwargs", "message"),
    [
        ([1, 2], {"top_k": 100_000}, "top_k must be at most the vocabulary size"),
        ([1, 2], {"stop_token_ids": [1_000_000_000], "min_tokens": 2}, "stop_token_ids"),
        ([1, 2], {"logit_bias": {100_000: 1.0}}, "logit_bias"),
        ([1, 100_000], {}, "prompt token ids"),
        ([1, True], {}, "prompt token ids"),
        ([1, 2], {"logprobs": 21}, "logprobs must be at most 20"),
    ],
)
def test_the_engine_checks_what_depends_on_the_model(engine, prompt, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("x", prompt, SamplingParams(**kwargs))
    assert not engine.has_unfinished_requests()


def test_n_samples_of_the_largest_seed_stay_valid(engine):
    params = SamplingParams(n=2, seed=2**63 - 1, max_tokens=2, temperature=1.0)
    engine.add_request("seeded", [1, 2, 3], params)
    finals = run_to_end(engine)
    assert [len(c.token_ids) for c in finals["seeded"].outputs] == [2, 2]


def test_min_tokens_ignores_ids_the_logits_lack():
    torch = pytest.importorskip("torch")
    params = SamplingParams(min_tokens=3, stop_token_ids=[2, 10**6])
    seq = ScheduledSeq("r", [0], 0, [0], True, params, eos_token_ids=frozenset({1, 99}))
    out = apply_min_tokens(torch.zeros(1, 8), [seq])
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [1, 2]


# -- a step that raises ---------------------------------------------------------------------


def set_mode(engine: LLMEngine, mode: str) -> None:
    # On the CPU the launch runs at once, but the engine follows the overlapped order.
    engine.overlap_steps = mode in ("overlap", "ahead")
    engine.schedule_ahead = mode == "ahead"


@pytest.fixture
def poisoned_sampler(monkeypatch):
    """The sampler raises for any batch with a POISON_SEED request; counts its calls."""
    real = Sampler.sample
    calls = []

    def sample(self, logits, seqs):
        calls.append(len(seqs))
        if any(s.params.seed == POISON_SEED for s in seqs):
            raise IndexError("index 1000000000 is out of bounds")
        return real(self, logits, seqs)

    monkeypatch.setattr(Sampler, "sample", sample)
    return calls


@pytest.fixture(scope="module")
def reference(engine):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", prompt, GREEDY)
    finals = run_to_end(engine)
    return [finals[f"ref{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]


@pytest.mark.parametrize("mode", ["serial", "overlap", "ahead"])
@pytest.mark.parametrize("joins_after_steps", [0, 2])
def test_a_request_that_breaks_a_step_fails_alone(
    engine, reference, poisoned_sampler, mode, joins_after_steps
):
    set_mode(engine, mode)
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"ok{i}", prompt, GREEDY)
        early = [out for _ in range(joins_after_steps) for out in engine.step()]
        assert not any(isinstance(out, FailedRequestOutput) for out in early)
        poison = SamplingParams(temperature=0, seed=POISON_SEED, max_tokens=4, n=2)
        engine.add_request("bad", [1, 2, 3], poison)
        finals = run_to_end(engine)
    finally:
        set_mode(engine, "serial")
    bad = finals.pop("bad")
    assert isinstance(bad, FailedRequestOutput) and bad.finished
    assert isinstance(bad.error, RequestFailedError)
    assert "IndexError: index 1000000000 is out of bounds" in str(bad.error)
    assert [c.finish_reason for c in bad.outputs] == ["abort", "abort"]
    # The others, in the same batch, got exactly the tokens they get without it.
    got = [finals[f"ok{i}"].outputs[0] for i in range(len(PROMPTS))]
    assert not any(isinstance(finals[f"ok{i}"], FailedRequestOutput) for i in range(len(PROMPTS)))
    assert [c.token_ids for c in got] == reference
    assert {c.finish_reason for c in got} == {"length"}
    assert engine.kv_cache_manager.usage() == 0.0
    assert engine.stats()["num_running"] == engine.stats()["num_waiting"] == 0
    # Bisection re-ran halves of the batch a bounded number of times.
    assert len(poisoned_sampler) < 40


def test_parameters_changed_after_add_are_caught_by_revalidation(engine, reference):
    for i, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(f"ok{i}", prompt, GREEDY)
    params = SamplingParams(temperature=1.0, max_tokens=4)
    engine.add_request("changed", [1, 2, 3], params)
    params.top_k = 10**20  # the request, past the constructor's check
    finals = run_to_end(engine)
    changed = finals.pop("changed")
    assert isinstance(changed, FailedRequestOutput)
    assert isinstance(changed.error, InvalidRequestError) and "top_k" in str(changed.error)
    assert [finals[f"ok{i}"].outputs[0].token_ids for i in range(2)] == reference[:2]
    assert engine.kv_cache_manager.usage() == 0.0


@pytest.mark.parametrize(
    "error",
    [
        WorkerError("worker rank 1 (pid 4242) died"),
        RuntimeError("CUDA error: device-side assert triggered"),
    ],
)
def test_a_failure_no_request_caused_leaves_step(engine, monkeypatch, error):
    def sample(self, logits, seqs):
        raise error

    monkeypatch.setattr(Sampler, "sample", sample)
    engine.add_request("victim", [1, 2, 3], GREEDY)
    with pytest.raises(type(error)):
        engine.step()
    monkeypatch.undo()
    engine.abort_request("victim")  # the step had not touched it: still abortable
    run_to_end(engine)
    assert engine.kv_cache_manager.usage() == 0.0


# -- the async front ------------------------------------------------------------------------


class StubEngine:
    """Finishes each request in one step; "bad" finishes failed, "crash" raises."""

    tokenizer = None
    max_model_len = 64

    def __init__(self) -> None:
        self.pending: list[str] = []

    def stats(self) -> dict[str, float]:
        return {}

    def add_request(self, request_id, prompt, params, priority=0):
        self.pending.append(request_id)

    def abort_request(self, ids):
        return []

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[RequestOutput]:
        if "crash" in self.pending:
            raise WorkerError("worker rank 0 exited with code -9")
        outputs = []
        for request_id in self.pending:
            out = RequestOutput(request_id, None, [1], [CompletionOutput(0, "x", [7])], True)
            if request_id == "bad":
                out = FailedRequestOutput.of(out, InvalidRequestError("no good"))
            outputs.append(out)
        self.pending = []
        return outputs

    def shutdown(self) -> None:
        pass


async def finish(stream) -> list[RequestOutput]:
    outputs = []
    while not stream.finished:
        outputs += await stream.next_outputs()
    return outputs


def test_a_failed_request_raises_in_its_own_stream_only():
    async def main():
        runner = AsyncLLMEngine(StubEngine())
        died: list[BaseException] = []
        runner.on_dead(died.append)
        runner.start()
        bad, good = runner.new_stream(), runner.new_stream()
        await bad.add("bad", [1], GREEDY)
        await good.add("good", [1], GREEDY)
        with pytest.raises(InvalidRequestError, match="no good"):
            await finish(bad)
        assert [o.outputs[0].token_ids for o in await finish(good)] == [[7]]
        assert runner.is_running
        await runner.shutdown()
        await asyncio.sleep(0)
        assert died == []  # neither a failed request nor a shutdown is a death

    asyncio.run(main())


def test_an_unattributable_failure_kills_the_engine_and_calls_on_dead():
    async def main():
        runner = AsyncLLMEngine(StubEngine())
        died: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        runner.on_dead(died.set_result)
        runner.start()
        stream = runner.new_stream()
        await stream.add("crash", [1], GREEDY)
        with pytest.raises(EngineDeadError, match="exited with code -9"):
            await finish(stream)
        assert isinstance(await asyncio.wait_for(died, 10), WorkerError)
        assert not runner.is_running
        await runner.shutdown()

    asyncio.run(main())
