"""Host (CPU-side) time of a structured-output step at batch 1 and 64, without a GPU.

At 64 rows a GPU step of a small model is host-bound, and a constrained step's bitmasks
depend on the step before: every host microsecond of matcher work is on the critical path
(issue 15). This bench runs the engine's own loop (overlapped, scheduled ahead, sampling
deferred until the bitmasks are filled, as on a GPU) over ``random:qwen3-0.6b``'s
tokenizer (151,936 ids) with a stand-in executor that runs no model: it reads each step's
bitmask rows as the sampler does (``_stacked_rows``, one copy as to a device) and returns,
for a constrained row, a token drawn uniformly from the ones its grammar allows (what the
argmax of random logits under the mask is), for an unconstrained row any ordinary token.

The stand-in's token draw (reading 64 rows of 151,936 bits on the host, a device's work on
a GPU) is timed apart and subtracted: ``host_ms`` is the engine thread's CPU time per
step without it. CPU time, not wall time, because the machine is shared; rounds alternate
plain and constrained (and as many rounds as ``--rounds``), and the report gives medians
and the spread over rounds, with each phase (matchers advanced, bitmasks filled) apart.

    python bench/structured_host.py --batch 1 64 --rounds 7 --json out.json
    python bench/structured_host.py --batch 64 --profile     # cProfile of one json round
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.sampler import _stacked_rows
from tessellm.interfaces.engine import Executor
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.plugins import Registration, discover
from tessellm.sampling_params import SamplingParams, StructuredOutputsParams

sys.path.insert(0, str(Path(__file__).parent))
from structured_outputs import long_schema


class Clock:
    """The stand-in's token draws (CPU and wall seconds), subtracted from the step's."""

    device_seconds = 0.0
    device_wall_seconds = 0.0


class StandInStep:
    """A launched step: its forward pass is free; sampling reads the bitmasks at
    ``sample()`` (as the GPU executor copies them then) and draws tokens at ``result()``."""

    def __init__(self, executor: StandInExecutor, plan: SchedulerOutput, deferred: bool) -> None:
        self.executor = executor
        self.plan = plan
        self.rows: list[bool] | None = None  # per sampling seq: constrained
        self.packed: Any = None
        self._result: StepResult | None = None
        if not deferred:
            self.sample()

    def sample(self) -> None:
        if self.rows is not None:
            return
        self.rows = [s.token_bitmask is not None for s in self.plan.seqs if s.sample]
        masked = [s.token_bitmask for s in self.plan.seqs if s.token_bitmask is not None]
        # The sampler's host part: the rows as one tensor, copied once (to_device on a GPU:
        # pin_memory() copies them into a block of torch's caching host allocator; a block
        # kept here, as a fresh one would page-fault on every step).
        if masked:
            stacked = _stacked_rows(masked)
            self.packed = self.executor.copy_block(stacked.shape).copy_(stacked)

    def result(self) -> StepResult:
        if self._result is None:
            self.sample()
            start, wall = time.thread_time(), time.perf_counter()
            tokens, k = [], 0
            for is_masked in self.rows or []:
                tokens.append(self.executor.draw(self.packed[k] if is_masked else None))
                k += is_masked
            self._result = StepResult(tokens)
            Clock.device_seconds += time.thread_time() - start
            Clock.device_wall_seconds += time.perf_counter() - wall
        return self._result


class StandInExecutor(Executor):
    """An asynchronous executor that runs no model (see the module docstring)."""

    name = "so-stand-in"
    asynchronous = True
    feeds_sampled_tokens = True
    defers_sampling = True
    max_concurrent_batches = 1
    verifies_drafts = False
    supports_sleep = False
    ordinary: np.ndarray = np.zeros(1, dtype=np.int64)
    vocab = 0

    def __init__(self, args: EngineArgs, resolved: Any, plugins: Any) -> None:
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.block = torch.empty(0, 0, dtype=torch.int32)

    @property
    def max_model_len(self) -> int:
        return self.args.max_model_len or 2048

    def describe(self) -> dict[str, str]:
        return {"executor": self.name}

    def available_blocks(self, extra_bytes_per_block: int = 0) -> int:
        return self.args.num_gpu_blocks_override or 1 << 16

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def copy_block(self, shape: torch.Size) -> torch.Tensor:
        if self.block.shape[1:] != shape[1:] or self.block.shape[0] < shape[0]:
            self.block = torch.empty(shape, dtype=torch.int32)
        return self.block[: shape[0]]

    def draw(self, row: Any) -> int:
        if row is None:
            return int(self.ordinary[self.rng.integers(len(self.ordinary))])
        # Uniform over the allowed tokens without unpacking the row: a word by its count
        # of set bits, then a set bit of that word.
        words = row.numpy().view(np.uint32)
        if hasattr(np, "bitwise_count"):
            counts = np.cumsum(np.bitwise_count(words))
        else:  # numpy < 2
            bits = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(-1, 32)
            counts = np.cumsum(bits.sum(axis=1))
        pick = int(self.rng.integers(int(counts[-1])))
        index = int(np.searchsorted(counts, pick, side="right"))
        word = int(words[index])
        skip = pick - (int(counts[index - 1]) if index else 0)
        for _ in range(skip):
            word &= word - 1  # drop the lowest set bit
        return index * 32 + (word & -word).bit_length() - 1

    def execute(self, plan: SchedulerOutput) -> StepResult:
        return StandInStep(self, plan, False).result()

    def launch(
        self, plan: SchedulerOutput, previous: Any = None, defer_sampling: bool = False
    ) -> StandInStep:
        return StandInStep(self, plan, defer_sampling)

    def shutdown(self) -> None:
        pass


def build(batch: int, max_model_len: int, model: str) -> LLMEngine:
    plugins = discover()
    plugins.registries["executors"][StandInExecutor.name] = Registration(
        "executors", StandInExecutor.name, StandInExecutor, "bench"
    )
    args = EngineArgs(
        model=model,
        max_model_len=max_model_len,
        max_num_seqs=batch,
        distributed_executor_backend=StandInExecutor.name,
        num_gpu_blocks_override=batch * (max_model_len // 16 + 2),
    )
    engine = LLMEngine(args, plugins)
    vocab = engine.model_config.vocab_size
    specials = set(engine.tokenizer.all_special_ids)
    StandInExecutor.vocab = vocab
    StandInExecutor.ordinary = np.array([t for t in range(vocab) if t not in specials])
    return engine


class Phases:
    """CPU seconds of the manager's per-step calls, by phase, while enabled."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        manager = engine.structured
        for attr, phase in (("accept", "accept"), ("fill_bitmasks", "fill")):
            inner = getattr(manager, attr)

            def timed(*a: Any, _inner: Any = inner, _phase: str = phase, **k: Any) -> Any:
                start = time.thread_time()
                try:
                    return _inner(*a, **k)
                finally:
                    self.seconds[_phase] += time.thread_time() - start

            setattr(manager, attr, timed)


def one_round(
    engine: LLMEngine, batch: int, output_len: int, so: Any, phases: Phases
) -> dict[str, float]:
    """Run ``batch`` requests of ``output_len`` tokens; per-step figures of the decode steps."""
    rng = random.Random(batch)
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=so is None, structured_outputs=so
    )
    if so is not None:
        engine.validate_structured(params)  # compiled outside the timed part
    for i in range(batch):
        prompt = [int(StandInExecutor.ordinary[rng.randrange(20000)]) for _ in range(32)]
        engine.add_request(f"r{time.monotonic_ns()}_{i}", prompt, params)
    engine.step()  # the prefill (and admission): not a decode step
    phases.seconds.clear()
    Clock.device_seconds = Clock.device_wall_seconds = 0.0
    steps = tokens = 0
    wall, cpu = time.perf_counter(), time.thread_time()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        steps += 1
    cpu = time.thread_time() - cpu - Clock.device_seconds
    wall = time.perf_counter() - wall - Clock.device_wall_seconds
    if tokens != batch * output_len:
        raise SystemExit(f"expected {batch * output_len} tokens, got {tokens}")
    return {
        "host_ms": cpu / steps * 1e3,
        "wall_ms": wall / steps * 1e3,
        "accept_ms": phases.seconds["accept"] / steps * 1e3,
        "fill_ms": phases.seconds["fill"] / steps * 1e3,
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def measure(engine: LLMEngine, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    so = StructuredOutputsParams(json=long_schema(200), disable_any_whitespace=True)
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "json": []}
    phases = Phases(engine)
    for constraint in (None, so):  # warm-up
        one_round(engine, batch, args.output_len, constraint, phases)
    for _ in range(args.rounds):
        for name, constraint in (("plain", None), ("json", so)):
            runs[name].append(one_round(engine, batch, args.output_len, constraint, phases))
    overheads = [
        j["host_ms"] - p["host_ms"] for p, j in zip(runs["plain"], runs["json"], strict=True)
    ]
    row: dict[str, Any] = {"batch": batch, "output_len": args.output_len, "rounds": args.rounds}
    for name, rs in runs.items():
        for key in ("host_ms", "wall_ms", "accept_ms", "fill_ms"):
            if name == "plain" and key in ("accept_ms", "fill_ms"):
                continue
            row[f"{name}_{key}"] = summary([r[key] for r in rs])
    row["json_extra_host_ms"] = summary(overheads)
    plain = row["plain_host_ms"]["median"]
    row["json_extra_host_pct"] = round(100 * statistics.median(overheads) / plain, 1)
    return row


def profile(engine: LLMEngine, batch: int, args: argparse.Namespace) -> None:
    so = StructuredOutputsParams(json=long_schema(200), disable_any_whitespace=True)
    phases = Phases(engine)
    one_round(engine, batch, args.output_len, so, phases)
    prof = cProfile.Profile()
    prof.enable()
    one_round(engine, batch, args.output_len, so, phases)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(args.sort).print_stats(args.top)
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default="xgrammar")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="the profile's order")
    parser.add_argument("--top", type=int, default=40, help="the profile's rows")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    engine = build(max(args.batch), 32 + args.output_len + 16, args.model)
    engine.structured.compiler.default_backend = args.backend
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}",
        "model": args.model,
        "backend": args.backend,
        "rows": [],
    }
    for batch in args.batch:
        if args.profile:
            profile(engine, batch, args)
            continue
        row = measure(engine, batch, args)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
    engine.shutdown()
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
