"""Compiled verification steps on the CPU: batch-1 greedy tok/s of the default model on
bench/speculative_cpu.py's edit-the-text workload without speculation, with n-gram
speculation whose verification steps run on the compiled verification library
(``Q = 1 + k`` tokens per sequence), and with the same speculation verified eagerly
(``TESSELLM_CPU_COMPILE_VERIFY=0`` while that engine is built).

All engines are built first (``TESSELLM_CPU_COMPILE=wait``: every library built before
measuring); every round runs each engine over the same requests one at a time, the
engines in a shuffled order, so load from other processes falls on every mode. A mode's
figure is the median over all its requests of all rounds. Greedy outputs must be
identical across modes; the script checks it.

    python bench/speculative_cpu_verify.py --rounds 3 --k 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TESSELLM_CPU_COMPILE", "wait")
sys.path.insert(0, str(Path(__file__).parent))

import speculative_cpu as workload

VERIFY_ENV = "TESSELLM_CPU_COMPILE_VERIFY"


def build(model: str, config: str, dtype: str, compiled_verify: bool):
    previous = os.environ.get(VERIFY_ENV)
    os.environ[VERIFY_ENV] = "1" if compiled_verify else "0"
    try:
        return workload.build(model, config, dtype)
    finally:
        if previous is None:
            os.environ.pop(VERIFY_ENV)
        else:
            os.environ[VERIFY_ENV] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="of the rounds' shuffled orders")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": args.k})
    modes = {
        "none": ("none", True),
        f"ngram k={args.k}, verification compiled": (ngram, True),
        f"ngram k={args.k}, verification eager": (ngram, False),
    }
    engines = {name: build(args.model, c, args.dtype, v) for name, (c, v) in modes.items()}
    chats = workload.requests()
    for llm in engines.values():  # warm-up: first-call allocations
        workload.run_once(llm, chats[0], 8)
    counters = {name: _runner_counts(llm) for name, llm in engines.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {"e2e": [], "decode": []} for n in engines}
    outputs: dict[str, list[list[int]]] = {n: [] for n in engines}
    order = list(engines)
    rng = random.Random(args.seed)
    for round_index in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            for i, chat in enumerate(chats):
                e2e, decode, tokens = workload.run_once(engines[name], chat, args.max_tokens)
                samples[name]["e2e"].append(e2e)
                samples[name]["decode"].append(decode)
                if round_index == 0:
                    outputs[name].append(tokens)
                print(f"round {round_index} {name:38s} req {i}: {e2e:6.1f} tok/s e2e", flush=True)
    first = next(iter(engines))
    base = statistics.median(samples[first]["e2e"])
    report = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "results": [],
    }
    for name, llm in engines.items():
        stats = llm.engine.stats()
        decode_steps, verify_steps = (
            a - b for a, b in zip(_runner_counts(llm), counters[name], strict=True)
        )
        e2e = samples[name]["e2e"]
        row = {
            "mode": name,
            "e2e_tok_s_median": round(statistics.median(e2e), 2),
            "e2e_tok_s_range": [round(min(e2e), 2), round(max(e2e), 2)],
            "decode_tok_s_median": round(statistics.median(samples[name]["decode"]), 2),
            "speedup_vs_none": round(statistics.median(e2e) / base, 3),
            "same_greedy_tokens_as_none": outputs[name] == outputs[first],
            "acceptance_rate": round(stats.get("spec_decode_acceptance_rate", 0.0), 3),
            "mean_accepted_length": round(stats.get("spec_decode_mean_accepted_length", 0.0), 3),
            "compiled_decode_steps": decode_steps,
            "compiled_verification_steps": verify_steps,
        }
        report["results"].append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def _runner_counts(llm) -> tuple[int, int]:
    """Steps run on the compiled decode and verification libraries so far."""
    runner = llm.engine.executor.runner.graph_runner
    return getattr(runner, "steps", 0), getattr(runner, "verify_steps", 0)


if __name__ == "__main__":
    main()
