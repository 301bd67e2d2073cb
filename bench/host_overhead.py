"""Host (CPU-side) time of an engine step at a full decode batch, without a GPU.

The engine runs with a stand-in executor that returns sampled tokens at once (random
ordinary token ids, so the detokenizer sees realistic ids), so what is timed is the
engine's own work: ``Scheduler.schedule``, ``Scheduler.update``, output processing
(detokenizer, stop strings, RequestOutputs) and the step loop around them. Once every
one of ``--batch`` sequences is decoding, ``--steps`` steps are timed, each phase apart.

``--gpu-ms X`` makes the stand-in behave like an asynchronous device: a launched step's
tokens are ready ``X`` ms after its launch, and waiting for them sleeps the rest. The
reported ``host_share`` is then the fraction of wall time that the "device" sits idle
waiting for the host, as ``bench/cuda_steps.py cpu-share`` measures it on a GPU.

    python bench/host_overhead.py                           # host ms per step, by phase
    python bench/host_overhead.py --gpu-ms 6.3 --json out.json
    python bench/host_overhead.py --real --model /path/to/tiny-model --batch 32
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessellm.bench.workload import LengthRange, make_workload, usable_token_ids
from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.plugins import Registration, discover
from tessellm.sampling_params import SamplingParams


class ReadyAt:
    """A launched stand-in step: its tokens are there ``ready_at`` (perf_counter time)."""

    def __init__(self, result: StepResult, ready_at: float) -> None:
        self._result = result
        self.ready_at = ready_at

    def result(self) -> StepResult:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self._result


class InstantExecutor:
    """Samples random ordinary tokens for every sampling sequence, with no model."""

    name = "instant"
    gpu_seconds = 0.0  # set by the bench before the engine starts
    asynchronous = True
    token_ids: tuple[int, ...] = ()

    def __init__(self, args: EngineArgs, resolved: Any, plugins: Any) -> None:
        self.args = args
        self.stream: list[int] = []
        self.offset = 0

    @property
    def max_model_len(self) -> int:
        return self.args.max_model_len or 2048

    def describe(self) -> dict[str, str]:
        return {"executor": self.name}

    def available_blocks(self) -> int:
        return self.args.num_gpu_blocks_override or 1 << 16

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def _sample(self, plan: SchedulerOutput) -> StepResult:
        if not self.stream:
            # A fixed random stream, read in slices: "sampling" costs next to nothing, so
            # the critical path measured is the engine's alone.
            rng = random.Random(self.args.seed)
            self.stream = [rng.choice(self.token_ids) for _ in range(1 << 14)]
        count = sum(s.sample for s in plan.seqs)
        if self.offset + count > len(self.stream):
            self.offset = 0
        start, self.offset = self.offset, self.offset + count + 1
        return StepResult(self.stream[start : start + count])

    def execute(self, plan: SchedulerOutput) -> StepResult:
        return self.launch(plan).result()

    feeds_sampled_tokens = True  # nothing to feed: its tokens do not depend on inputs

    def launch(self, plan: SchedulerOutput, previous: Any = None) -> ReadyAt:
        # Queued behind the step still running, as on a device.
        start = max(time.perf_counter(), previous[1].ready_at if previous else 0.0)
        return ReadyAt(self._sample(plan), start + self.gpu_seconds)

    def shutdown(self) -> None:
        pass


class GcTimer:
    """Time spent in Python's cyclic garbage collector while enabled, by generation."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self.enabled:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1


class CriticalPath:
    """CPU time from a step's tokens reaching the host to the launch of the next step:
    the host work that the device waits for. Serially that is everything (update, output
    processing, the caller, schedule); with the overlap, output processing is off it;
    scheduled ahead, the next step is launched before the tokens arrive (counted 0: the
    device then waits only if a whole step's host work outlasts its own)."""

    def __init__(self) -> None:
        self.enabled = False
        self.cpu_seconds = 0.0
        self.count = 0
        self._arrived: float | None = None

    def wrap(self, engine: LLMEngine) -> None:
        tracker = self
        if not hasattr(engine, "_launch"):  # an engine from before the overlapped loop
            execute = engine.executor.execute

            def timed_execute(plan: SchedulerOutput) -> StepResult:
                if tracker.enabled and tracker._arrived is not None:
                    tracker.cpu_seconds += time.thread_time() - tracker._arrived
                    tracker.count += 1
                result = execute(plan)
                tracker._arrived = time.thread_time()
                return result

            engine.executor.execute = timed_execute
            return
        launch = engine._launch

        class Arrival:
            def __init__(self, pending: Any) -> None:
                self.pending = pending

            def result(self) -> StepResult:
                result = self.pending.result()
                tracker._arrived = time.thread_time()
                return result

        def timed_launch(plan: SchedulerOutput, previous: Any = None) -> Arrival:
            if previous is None:
                pending = launch(plan)
                waited = tracker._arrived is not None
            else:  # scheduled ahead: launched while the step before still runs
                pending = launch(plan, (previous[0], previous[1].pending))
                waited = False
                tracker.count += tracker.enabled
            if tracker.enabled and waited:
                tracker.cpu_seconds += time.thread_time() - tracker._arrived
                tracker.count += 1
            tracker._arrived = None
            return Arrival(pending)

        engine._launch = timed_launch


class PhaseTimer:
    """Wraps bound methods so each call's wall time adds to its phase while enabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        # CPU time of this thread: other processes on a busy machine inflate wall time only.
        self.cpu_seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        inner: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return inner(*args, **kwargs)
            start, cpu_start = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.cpu_seconds[phase] += time.thread_time() - cpu_start

        setattr(owner, attr, timed)


def build_engine(options: argparse.Namespace) -> LLMEngine:
    plugins = discover()
    backend = None
    if not options.real:
        plugins.registries["executors"]["instant"] = Registration(
            "executors", "instant", InstantExecutor, "bench"
        )
        InstantExecutor.gpu_seconds = options.gpu_ms / 1e3
        backend = "instant"
    args = EngineArgs(
        model=options.model,
        max_model_len=options.max_model_len,
        max_num_seqs=options.batch,
        distributed_executor_backend=backend,
        enforce_eager=options.real,
    )
    if not options.real:
        # Blocks for every sequence at full length: no preemption muddles the figure.
        args.num_gpu_blocks_override = options.batch * (options.max_model_len // 16 + 1)
    return LLMEngine(args, plugins)


def run(options: argparse.Namespace) -> dict[str, Any]:
    engine = build_engine(options)
    vocab = engine.model_config.vocab_size
    ordinary = usable_token_ids(vocab, engine.tokenizer.all_special_ids)
    InstantExecutor.token_ids = tuple(ordinary)  # of ints only: the collector skips it
    lengths = LengthRange.parse(options.lengths)
    workload = make_workload(options.num_prompts, lengths, lengths, ordinary, seed=0)
    del ordinary
    for i, req in enumerate(workload):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=options.steps + options.warmup + 64,  # nobody leaves mid-measurement
            ignore_eos=True,
            stop=options.stop or None,
        )
        engine.add_request(str(i), req.prompt_token_ids, params)
    del workload, req  # the engine holds its own copies
    if options.overlap is not None:
        engine.overlap_steps = options.overlap == "on"
    if options.schedule_ahead is not None:
        engine.schedule_ahead = options.schedule_ahead == "on"

    timer = PhaseTimer()
    gc_timer = GcTimer()
    critical = CriticalPath()
    critical.wrap(engine)
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.scheduler, "update", "update")
    for name in ("advance", "fill"):  # the schedule-ahead loop's update, in two halves
        if hasattr(engine.scheduler, name):
            timer.wrap(engine.scheduler, name, name)
    timer.wrap(engine.output_processor, "process", "output_processing")
    if hasattr(engine, "_launch"):
        timer.wrap(engine, "_launch", "launch")  # with --real on a CPU: the forward too
    # Prefill until every sequence decodes (the stand-in computes prompts instantly).
    for _ in range(10_000):
        engine.step()
        decoding = sum(r.num_tokens - r.num_computed_tokens == 1 for r in engine.scheduler.running)
        if decoding >= options.batch:
            break
    else:
        raise SystemExit(f"never reached {options.batch} decoding sequences")
    for _ in range(options.warmup):
        engine.step()

    timer.enabled = gc_timer.enabled = critical.enabled = True
    walls = []
    batch_sizes = []
    start, cpu_start = time.perf_counter(), time.thread_time()
    for _ in range(options.steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
        batch_sizes.append(len(engine.scheduler.running))
    elapsed = time.perf_counter() - start
    cpu = time.thread_time() - cpu_start
    engine.shutdown()

    def per_step(seconds: dict[str, float]) -> dict[str, float]:
        return {k: round(v / options.steps * 1e3, 3) for k, v in sorted(seconds.items())}

    walls.sort()
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
        "model": options.model,
        "executor": "real" if options.real else "instant",
        "overlap_steps": getattr(engine, "overlap_steps", False),
        "schedule_ahead": getattr(engine, "schedule_ahead", False),
        "batch": options.batch,
        "min_running": min(batch_sizes),
        "steps": options.steps,
        "stop_strings": options.stop,
        "step_wall_ms_mean": elapsed / options.steps * 1e3,
        "step_wall_ms_median": walls[len(walls) // 2] * 1e3,
        "step_cpu_ms_mean": cpu / options.steps * 1e3,
        "critical_cpu_ms_per_step": critical.cpu_seconds / max(critical.count, 1) * 1e3,
        "phase_ms_per_step": per_step(timer.seconds),
        "phase_cpu_ms_per_step": per_step(timer.cpu_seconds),
        # Collections run inside whichever phase allocates: their time is in the above.
        "gc_ms_per_step_by_generation": [
            round(t / options.steps * 1e3, 3) for t in gc_timer.seconds
        ],
        "gc_collections_by_generation": gc_timer.counts,
    }
    if options.gpu_ms and not options.real:
        result["gpu_ms"] = options.gpu_ms
        result["host_share"] = max(0.0, 1 - options.gpu_ms / result["step_wall_ms_mean"])
        # From CPU time, which other processes on a busy machine do not inflate.
        crit = result["critical_cpu_ms_per_step"]
        result["host_share_from_cpu_time"] = crit / (crit + options.gpu_ms)
    return result


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--lengths", default="100:1024", help="prompt and output lengths")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--gpu-ms", type=float, default=0.0, help="stand-in device time")
    parser.add_argument("--stop", action="append", help="a stop string for every request")
    parser.add_argument("--overlap", choices=["on", "off"], help="override the engine default")
    parser.add_argument("--schedule-ahead", choices=["on", "off"], help="the same")
    parser.add_argument("--real", action="store_true", help="run the model (its executor)")
    parser.add_argument("--json")
    options = parser.parse_args()
    result = run(options)
    print(json.dumps(result, indent=2), flush=True)
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
