"""Tensor parallelism: TP=2 gives TP=1's greedy tokens (mp over gloo, Ray, NCCL on GPUs),
and a worker that raises or dies ends the engine with a clear error and no process left."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TEST_PROMPTS, live_descendants, save_tiny_model, tiny_llama_config

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError, WorkerError
from tessellm.executors.base import check_tensor_parallel_fit
from tessellm.executors.start_method import START_METHOD_ENV, choose_start_method, line_is_guarded
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput

# Alone, not beside other tests (the README's command runs these after the parallel
# part): Ray places its actors on a loaded machine late or not at all.
pytestmark = pytest.mark.serial

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


def test_step_that_raises_on_every_rank_leaves_the_workers_serving(tp2_engines):
    # (A rank left waiting in a collective stops them all: tests/test_fault_isolation_tp.py.)
    llm = tp2_engines("gqa")
    pids = llm.engine.executor.worker_pids
    # A block id far past the cache makes every rank's KV write fail, before any collective.
    bad = ScheduledSeq("x", [5, 6], 0, [10**6], True, SamplingParams(temperature=0.0))
    with pytest.raises(IndexError, match="out of bounds") as raised:
        llm.engine.executor.execute(SchedulerOutput([bad], 2))
    assert "raised on tensor-parallel rank 0" in raised.value.__notes__[0]
    assert llm.engine.executor.failure is None
    assert set(pids) <= live_descendants(os.getpid())
    assert len(llm.generate(["Hello"], GREEDY)[0].outputs[0].token_ids) == NEW_TOKENS


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


# -- workers that start from any script ------------------------------------------------------
SCRIPT_TOKENS = 8
# A plain script as a user writes one: no `if __name__ == "__main__":`. The matmul first
# runs torch's OpenMP pool in the parent, which a forked child's first thread cannot use.
UNGUARDED_SCRIPT = """\
import json, torch
from tessellm import LLM, SamplingParams
torch.ones(256, 256) @ torch.ones(256, 256)
llm = LLM(model={model!r}, dtype="float32", device="cpu", tensor_parallel_size=2)
params = SamplingParams(temperature=0.0, max_tokens={tokens}, ignore_eos=True)
outs = llm.generate({prompts!r}, params)
print(json.dumps({{"start_method": llm.engine.describe()["start_method"],
                  "tokens": [o.outputs[0].token_ids for o in outs]}}))
"""
GUARDED_SCRIPT = """\
import json
from tessellm import LLM, SamplingParams

def main():
    llm = LLM(model={model!r}, dtype="float32", device="cpu", tensor_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens={tokens}, ignore_eos=True)
    outs = llm.generate({prompts!r}, params)
    print(json.dumps({{"start_method": llm.engine.describe()["start_method"],
                      "tokens": [o.outputs[0].token_ids for o in outs]}}))

if __name__ == "__main__":
    main()
"""
# Starts the engine from a thread: the early check cannot see the script's top level on
# that thread's stack, so only the spawned child's own check catches the re-run.
THREADED_SCRIPT = """\
import sys, threading, traceback
from tessellm import LLM

failed = []

def start():
    try:
        LLM(model={model!r}, dtype="float32", device="cpu", tensor_parallel_size=2)
    except Exception:
        failed.append(traceback.format_exc())

thread = threading.Thread(target=start)
thread.start()
thread.join()
sys.exit("".join(failed) or None)
"""


def run_script(tmp_path: Path, template: str, model: Path, **env: str):
    script = tmp_path / "script.py"
    script.write_text(
        template.format(model=str(model), tokens=SCRIPT_TOKENS, prompts=TEST_PROMPTS[:3])
    )
    environ = {k: v for k, v in os.environ.items() if k != START_METHOD_ENV}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=240,  # a deadlocked fork fails here, not in CI's global timeout
    )


@pytest.fixture(scope="module")
def tp1_script_tokens(tiny_llama) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=SCRIPT_TOKENS, ignore_eos=True)
    outs = make_llm(tiny_llama).generate(TEST_PROMPTS[:3], params)
    return [o.outputs[0].token_ids for o in outs]


def test_unguarded_script_forks_its_workers(tmp_path, tiny_llama, tp1_script_tokens):
    # Two threads per worker (not one): a deadlock after fork needs a parallel region.
    done = run_script(tmp_path, UNGUARDED_SCRIPT, tiny_llama, OMP_NUM_THREADS="2")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"start_method": "fork", "tokens": tp1_script_tokens}


def test_spawn_override_refuses_an_unguarded_script_and_runs_a_guarded_one(
    tmp_path, tiny_llama, tp1_script_tokens
):
    refused = run_script(tmp_path, UNGUARDED_SCRIPT, tiny_llama, **{START_METHOD_ENV: "spawn"})
    assert refused.returncode != 0
    assert "ConfigError" in refused.stderr
    assert f"{START_METHOD_ENV}=spawn" in refused.stderr
    assert "script.py line 4 would run" in refused.stderr
    assert 'if __name__ == "__main__":' in refused.stderr
    ran = run_script(tmp_path, GUARDED_SCRIPT, tiny_llama, **{START_METHOD_ENV: "spawn"})
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result == {"start_method": "spawn", "tokens": tp1_script_tokens}


def test_spawned_child_that_reruns_the_script_is_explained(tmp_path, tiny_llama):
    done = run_script(tmp_path, THREADED_SCRIPT, tiny_llama, **{START_METHOD_ENV: "spawn"})
    assert done.returncode != 0
    assert "WorkerError: tensor-parallel workers start with 'spawn' here" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    assert "exited with code" not in done.stderr


def test_start_method_choice(monkeypatch):
    from tessellm.executors import start_method

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    assert choose_start_method("cpu")[0] == "fork"
    assert choose_start_method("xla")[0] == "spawn"
    monkeypatch.setattr(start_method, "cuda_initialised", lambda: True)
    assert choose_start_method("cuda") == ("spawn", "CUDA is already initialised in this process")
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert choose_start_method("cpu") == ("spawn", f"{START_METHOD_ENV}=spawn")
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    with pytest.raises(ConfigError, match="choose one of fork, spawn"):
        choose_start_method("cpu")


@pytest.mark.parametrize(
    ("source", "line", "guarded"),
    [
        ("x = 1\nstart()\n", 2, False),
        ('if __name__ == "__main__":\n    start()\n', 2, True),
        ("if '__main__' == __name__ and True:\n    pass\nelse:\n    start()\n", 4, False),
        ('if __name__ != "__main__":\n    pass\nelse:\n    start()\n', 4, True),
        ('if __name__ in ("__main__",):\n    with ctx:\n        start()\n', 3, True),
        (
            'try:\n    start()\nexcept E:\n    pass\nif __name__ == "__main__":\n    go()\n',
            2,
            False,
        ),
    ],
)
def test_main_guard_detection(source, line, guarded):
    assert line_is_guarded(ast.parse(source), line) is guarded
