"""Fault isolation under tensor parallelism (TP=2 over gloo): a step that raises on the
workers fails only the request(s) that caused it while the workers keep serving (the
engine re-runs parts of the plan on every rank); only a rank left waiting in a collective
stops them all."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch.distributed as dist
from conftest import live_descendants, run_to_end

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.model_runner import ModelRunner
from tessellm.engine.sampler import Sampler
from tessellm.engine.step_recovery import FailedRequestOutput, RequestFailedError, is_fatal
from tessellm.errors import InvalidRequestError, StepError, WorkerError
from tessellm.executors.start_method import START_METHOD_ENV
from tessellm.executors.worker import RaisedInStep
from tessellm.sampling_params import SamplingParams

# Alone, not beside other tests (the README's command runs these after the parallel
# part): Ray places its actors on a loaded machine late or not at all.
pytestmark = pytest.mark.serial

# Seeds that make the patched workers fail (the patch is inherited by forked workers); far
# apart, since the samples of an n > 1 request get seed + i.
RAISE_ON_EVERY_RANK = 1000  # the sampler raises on every rank (data-dependent)
RAISE_ON_RANK_0 = 2000  # the sampler raises on rank 0 only, after the last collective
RAISE_BEFORE_COLLECTIVE = 3000  # rank 1 raises before the forward: rank 0 waits for it
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 5, 9, 11], [1, 6, 9, 11, 13], [2, 7], [1, 5, 9, 11, 40, 41, 42]]


def seeds_in(seqs) -> set[int | None]:
    return {s.params.seed for s in seqs}


def faulty_sample(real):
    def sample(self, logits, seqs):
        seeds = seeds_in(seqs)
        if RAISE_ON_EVERY_RANK in seeds or (RAISE_ON_RANK_0 in seeds and dist.get_rank() == 0):
            raise IndexError("index 1000000000 is out of bounds")
        return real(self, logits, seqs)

    return sample


def faulty_prepare_inputs(real):
    def prepare_inputs(self, plan):
        if RAISE_BEFORE_COLLECTIVE in seeds_in(plan.seqs) and dist.get_rank() == 1:
            raise RuntimeError("rank 1 cannot prepare this step")
        return real(self, plan)

    return prepare_inputs


@pytest.fixture(scope="module")
def make_engine(tiny_llama):
    """TP=2 ``mp`` engines whose workers, forked after the patch, carry the faults above."""
    made: list[LLMEngine] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(START_METHOD_ENV, "fork")
        patch.setattr(Sampler, "sample", faulty_sample(Sampler.sample))
        patch.setattr(
            ModelRunner, "prepare_inputs", faulty_prepare_inputs(ModelRunner.prepare_inputs)
        )

        def make(**kwargs) -> LLMEngine:
            args = EngineArgs(
                model=str(tiny_llama),
                dtype="float32",
                device="cpu",
                max_num_seqs=8,
                tensor_parallel_size=2,
                **kwargs,
            )
            made.append(LLMEngine(args))
            return made[-1]

        yield make
    for engine in made:
        engine.shutdown()


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def reference(engine):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", prompt, GREEDY)
    finals = run_to_end(engine)
    return [finals[f"ref{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]


def run_with(engine: LLMEngine, bad_params: SamplingParams, mutate=None, joins_after=2):
    """The reference prompts, then a bad request joining after some steps: all finals."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ok{i}", prompt, GREEDY)
    early = [out for _ in range(joins_after) for out in engine.step()]
    assert not any(isinstance(out, FailedRequestOutput) for out in early)
    engine.add_request("bad", [1, 2, 3], bad_params)
    if mutate is not None:
        mutate(bad_params)
    return run_to_end(engine)


def assert_others_unharmed(engine: LLMEngine, finals, reference) -> None:
    got = [finals[f"ok{i}"] for i in range(len(PROMPTS))]
    assert not any(isinstance(out, FailedRequestOutput) for out in got)
    assert [out.outputs[0].token_ids for out in got] == reference
    assert engine.executor.failure is None
    assert engine.kv_cache_manager.usage() == 0.0
    # The workers still serve.
    engine.add_request("after", PROMPTS[0], GREEDY)
    assert run_to_end(engine)["after"].outputs[0].token_ids == reference[0]


@pytest.mark.parametrize("seed", [RAISE_ON_EVERY_RANK, RAISE_ON_RANK_0])
def test_a_sampler_failure_on_the_workers_fails_only_its_request(engine, reference, seed):
    bad_params = SamplingParams(temperature=0, seed=seed, max_tokens=4, n=2)
    finals = run_with(engine, bad_params)
    bad = finals.pop("bad")
    assert isinstance(bad, FailedRequestOutput) and bad.finished
    assert isinstance(bad.error, RequestFailedError)
    assert "IndexError: index 1000000000 is out of bounds" in str(bad.error)
    assert [c.finish_reason for c in bad.outputs] == ["abort", "abort"]
    assert_others_unharmed(engine, finals, reference)


def test_parameters_changed_after_add_fail_by_revalidation(engine, reference):
    # The request, past the constructor's check: the real sampler overflows on
    # every rank, and the driver gets the workers' ValueError back.
    def mutate(params):
        params.top_k = 10**20

    finals = run_with(engine, SamplingParams(temperature=1.0, max_tokens=4), mutate)
    bad = finals.pop("bad")
    assert isinstance(bad, FailedRequestOutput)
    assert isinstance(bad.error, InvalidRequestError) and "top_k" in str(bad.error)
    assert_others_unharmed(engine, finals, reference)


def test_a_rank_left_in_a_collective_stops_the_engine(make_engine):
    engine = make_engine()
    pids = engine.executor.worker_pids
    engine.add_request("ok", PROMPTS[0], GREEDY)
    engine.add_request("bad", [1, 2, 3], SamplingParams(seed=RAISE_BEFORE_COLLECTIVE))
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 raised in execute \(RuntimeError.*out of step"):
        run_to_end(engine)
    assert time.monotonic() - start < 30  # the grace after the raise, not the 300 s timeout
    assert engine.executor.failure is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    assert not set(pids) & live_descendants(os.getpid())


def test_ray_workers_report_a_step_failure_without_stopping(tiny_llama, reference):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        args = EngineArgs(
            model=str(tiny_llama),
            dtype="float32",
            device="cpu",
            max_num_seqs=8,
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
        )
        engine = LLMEngine(args)
        try:

            def mutate(params):
                params.top_k = 10**20

            finals = run_with(engine, SamplingParams(temperature=1.0, max_tokens=4), mutate)
            bad = finals.pop("bad")
            assert isinstance(bad.error, InvalidRequestError) and "top_k" in str(bad.error)
            assert_others_unharmed(engine, finals, reference)
        finally:
            engine.shutdown()
    finally:
        ray.shutdown()


class NeedsTwoArguments(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raised(exc: Exception) -> RaisedInStep:
    try:
        raise exc
    except Exception as caught:
        return RaisedInStep.of(caught, rank=1)


def test_a_worker_exception_comes_back_as_itself_or_as_a_step_error():
    back = pickle.loads(pickle.dumps(raised(InvalidRequestError("top_k is too large"))))
    exc = back.exception()
    assert type(exc) is InvalidRequestError and str(exc) == "top_k is too large"
    assert "raised on tensor-parallel rank 1" in exc.__notes__[0]
    exc = raised(NeedsTwoArguments("x", "y")).exception()  # pickles, but cannot unpickle
    assert type(exc) is StepError and str(exc) == "NeedsTwoArguments: x/y"
    assert not is_fatal(exc)
    lost = raised(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal(lost.exception())
