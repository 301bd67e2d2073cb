"""How fast eager steps run while the CPU decode libraries build in the background.

A server's first minutes on a new model: the engine serves eagerly while a child process
exports and compiles its decode steps (``tessellm_cpu.background_build``). This times,
in one process, prompts of ~30 new tokens each (``max_tokens=1``, a different prompt
every time so no prefix-cache hit) and one 32-token greedy decode, in two modes run as
subprocesses one after the other: ``build`` (an empty compile cache: the build runs
throughout the measurement; the run checks that it does) and ``off``
(``TESSELLM_CPU_COMPILE=0``: no build, the baseline). The model's download and
conversion are reused from ``TESSELLM_CACHE`` (linked into a temporary cache).

    python bench/eager_during_build.py [--runs 8] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    *("apple", "banana", "cherry", "delta", "echo", "falcon"),
    *("golf", "hotel", "india", "juliet", "kilo", "lima"),
]
BASE = (
    "the quick brown fox jumps over the lazy dog and then runs into the forest where it "
    "finds a small river full of fish and"
)


def prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(3)) + " " + BASE


def measure(model: str, runs: int) -> dict[str, float]:
    from tessellm import LLM, SamplingParams

    llm = LLM(model=model)
    graph_runner = llm.engine.executor.runner.graph_runner
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([prompt(10_000)], one)  # first-call set-up, not timed
    prefill_ms = []
    for k in range(runs):
        start = time.perf_counter()
        llm.generate([prompt(k)], one)
        prefill_ms.append((time.perf_counter() - start) * 1e3)
    decode = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([prompt(20_000)], decode)
    decode_s = time.perf_counter() - start
    building = bool(getattr(graph_runner, "pending", None))  # still building at the end?
    return {
        "prefill_ms_median": round(statistics.median(prefill_ms), 1),
        "prefill_ms_min": round(min(prefill_ms), 1),
        "decode_32_tokens_s": round(decode_s, 2),
        "build_running_throughout": building,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mode", choices=("build", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # the child: one mode, one JSON line
        print(json.dumps({"mode": args.mode, **measure(args.model, args.runs)}), flush=True)
        return
    from tessellm.config import default_cache_dir

    source = default_cache_dir()
    for mode in ("build", "off"):
        with tempfile.TemporaryDirectory(prefix="tessellm-eager-build-") as tmp:
            for name in ("models", "converted"):  # the download and conversion, not builds
                if (source / name).exists():
                    (Path(tmp) / name).symlink_to(source / name)
            env = {**os.environ, "TESSELLM_CACHE": tmp}
            env["TESSELLM_CPU_COMPILE"] = "1" if mode == "build" else "0"
            cmd = [sys.executable, __file__, "--mode", mode, "--runs", str(args.runs)]
            out = subprocess.run(
                [*cmd, "--model", args.model], env=env, capture_output=True, text=True
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else f"{mode} failed: {out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
