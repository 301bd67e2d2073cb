"""Tensor parallelism: TP=2 gives TP=1's greedy tokens (mp over gloo, Ray, NCCL on GPUs),
and a worker that raises or dies ends the engine with a clear error and no process left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TEST_PROMPTS, live_descendants, save_tiny_model, tiny_llama_config

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError, WorkerError
from tessellm.executors.base import check_tensor_parallel_fit
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def fewer_kv_heads_llama(tmp_path_factory) -> Path:
    # One KV head for two ranks (replicated), a vocabulary that does not split evenly, and
    # an LM head tied to the embedding: the awkward cases of sharding.
    config = tiny_llama_config(num_key_value_heads=1, vocab_size=251, tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny-llama-mqa"), seed=1)


@pytest.fixture(scope="module")
def models(tiny_llama, fewer_kv_heads_llama) -> dict[str, Path]:
    return {"gqa": tiny_llama, "kv1": fewer_kv_heads_llama}


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", **kwargs)


def batched_greedy(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outs = llm.generate(TEST_PROMPTS, GREEDY)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [
        [
            step[tok].logprob
            for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
        ]
        for o in outs
    ]
    return tokens, logprobs


@pytest.fixture(scope="module")
def tp2_engines(models) -> Callable[[str], LLM]:
    """A live TP=2 ``mp`` engine per model, shared; the fault tests kill theirs, so a dead
    one is replaced when asked for again."""
    made: dict[str, LLM] = {}

    def get(name: str) -> LLM:
        llm = made.get(name)
        if llm is None or llm.engine.executor.failure is not None:
            llm = made[name] = make_llm(models[name], tensor_parallel_size=2)
        return llm

    yield get
    for llm in made.values():
        llm.engine.shutdown()


def assert_gone(pids: list[int], before: set[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert live_descendants(os.getpid()) <= before


@pytest.mark.parametrize("name", ["gqa", "kv1"])
def test_tp2_over_gloo_matches_tp1(name, models, tp2_engines):
    tp1 = make_llm(models[name])
    tokens_1, logprobs_1 = batched_greedy(tp1)
    llm = tp2_engines(name)
    assert llm.engine.describe()["executor"] == "mp"
    assert llm.engine.describe()["tensor_parallel_size"] == "2"
    tokens_2, logprobs_2 = batched_greedy(llm)
    assert tokens_2 == tokens_1
    assert torch.allclose(torch.tensor(logprobs_2), torch.tensor(logprobs_1), atol=1e-4)


def test_heads_that_do_not_split_are_refused_before_spawning(tiny_llama):
    with pytest.raises(ConfigError, match="4 attention heads do not divide evenly"):
        make_llm(tiny_llama, tensor_parallel_size=3)
    check_tensor_parallel_fit(tiny_llama_config(num_key_value_heads=2), 4)  # replicated: fine
    with pytest.raises(ConfigError, match="3 KV heads"):
        check_tensor_parallel_fit(
            tiny_llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2
        )


def test_worker_that_raises_stops_every_worker(tp2_engines):
    before = live_descendants(os.getpid())
    llm = tp2_engines("gqa")
    pids = llm.engine.executor.worker_pids
    assert set(pids) <= live_descendants(os.getpid())
    # A block id far past the cache makes every rank's KV write fail.
    bad = ScheduledSeq("x", [5, 6], 0, [10**6], True, SamplingParams(temperature=0.0))
    with pytest.raises(
        WorkerError, match=r"(?s)worker rank \d \(pid \d+\) raised in execute:.*Error"
    ):
        llm.engine.executor.execute(SchedulerOutput([bad], 2))
    assert_gone(pids, before)
    with pytest.raises(WorkerError, match="earlier failure"):
        llm.generate(["Hello"], GREEDY)


def test_killed_worker_ends_engine_with_clear_error(tp2_engines):
    before = live_descendants(os.getpid())
    llm = tp2_engines("kv1")
    pids = llm.engine.executor.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL"):
        llm.generate(TEST_PROMPTS[:2], GREEDY)
    assert time.monotonic() - start < 30  # noticed at once, not after a collective timeout
    assert_gone(pids, before)


def test_ray_executor_matches_tp1(models):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tp1 = make_llm(models["gqa"])
        tokens_1, logprobs_1 = batched_greedy(tp1)
        llm = make_llm(models["gqa"], tensor_parallel_size=2, distributed_executor_backend="ray")
        assert llm.engine.describe()["executor"] == "ray"
        tokens_2, logprobs_2 = batched_greedy(llm)
        llm.engine.shutdown()
    finally:
        ray.shutdown()
    assert tokens_2 == tokens_1
    assert torch.allclose(torch.tensor(logprobs_2), torch.tensor(logprobs_1), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_tp2_over_nccl_matches_tp1(tiny_llama, enforce_eager):
    def run(**kwargs) -> list[list[int]]:
        llm = LLM(
            model=str(tiny_llama),
            dtype="float32",
            device="cuda",
            enforce_eager=enforce_eager,
            **kwargs,
        )
        outs = llm.generate(TEST_PROMPTS, GREEDY)
        llm.engine.shutdown()
        return [o.outputs[0].token_ids for o in outs]

    assert run(tensor_parallel_size=2) == run()
