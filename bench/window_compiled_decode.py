"""Decode tok/s of a windowed model (Gemma 3 270M: 15 windowed and 3 full layers) on the
CPU in three modes, one process:

- ``hybrid compiled``: windowed layers in KV groups of their own (the hybrid KV cache
  manager, the default) on the compiled decode library, one block table per group;
- ``hybrid eager``: the same layout with eager steps (what the hybrid layout ran before
  the compiled steps took several tables);
- ``one table compiled``: ``disable_hybrid_kv_cache_manager=True``, every layer in one
  table (windowed blocks kept), on its compiled library.

Every engine is built first (``TESSELLM_CPU_COMPILE=wait``: libraries built before
measuring). A measurement adds ``batch`` requests of ``--context`` prompt tokens (longer
than the window, so windowed groups have freed blocks), steps the engine until every
prompt has its first token, then times ``--steps`` decode steps: tok/s = batch x steps /
seconds. Rounds run the modes in a shuffled order, so load from other processes falls on
each; a figure is the median over rounds. Greedy tokens must be equal across modes.

    python bench/window_compiled_decode.py [--model gemma3-270m] [--rounds 3] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

os.environ.setdefault("TESSELLM_CPU_COMPILE", "wait")

from tessellm import LLM, SamplingParams

MIB = 1 << 20
MODES = {
    "hybrid compiled": {},
    "hybrid eager": {"enforce_eager": True},
    "one table compiled": {"disable_hybrid_kv_cache_manager": True},
}


def build(model: str, kv_mib: int, max_len: int, extra: dict) -> LLM:
    return LLM(
        model=model,
        max_num_seqs=16,
        max_model_len=max_len,
        kv_cache_memory_bytes=kv_mib * MIB,
        **extra,
    )


def prompts(batch: int, context: int) -> list[list[int]]:
    return [[(i * 37 + r * 101) % 5000 + 100 for i in range(context)] for r in range(batch)]


def measure(llm: LLM, batch: int, context: int, steps: int, tag: str) -> tuple[float, list]:
    """Decode tok/s over ``steps`` steps of ``batch`` sequences, and the greedy tokens."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    ids = [
        engine.add_request(f"{tag}-{i}", p, params) for i, p in enumerate(prompts(batch, context))
    ]
    started: set[str] = set()
    finished: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)

    while len(started) < batch:  # prompts, then one decode so every sequence decodes
        step()
    step()
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - begin
    while engine.has_unfinished_requests():
        step()
    return batch * steps / elapsed, [finished[i] for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--context", type=int, default=640, help="prompt tokens (> window)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-mib", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    max_len = args.context + args.steps + 64
    engines = {}
    for name, extra in MODES.items():
        began = time.monotonic()
        engines[name] = build(args.model, args.kv_mib, max_len, extra)
        print(f"built {name} in {time.monotonic() - began:.0f} s", flush=True)
    counters = {}
    for name, llm in engines.items():
        runner = llm.engine.executor.runner
        groups = [[len(g.layers), g.window] for g in runner.cache_layout.groups]
        compiled = runner.graph_runner
        print(name, "groups", groups, "compiled:", getattr(compiled, "ready_ranges", None))
        print(
            name,
            "dtype",
            runner.dtype,
            "kv cache",
            runner.kv_cache_dtype,
            "pages",
            runner.num_blocks,
        )
        measure(llm, 2, 64, 4, f"warm-{name}")  # first-call allocations
        counters[name] = getattr(compiled, "steps", 0)
    samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in engines for b in batches}
    tokens: dict[tuple[str, int], list] = {}
    order = list(engines)
    rng = random.Random(args.seed)
    for round_index in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            for batch in batches:
                tag = f"{name}-{batch}-{round_index}"
                rate, out = measure(engines[name], batch, args.context, args.steps, tag)
                samples[(name, batch)].append(rate)
                tokens.setdefault((name, batch), out)
                print(
                    f"round {round_index} {name:20s} batch {batch:2d}: {rate:7.1f} tok/s",
                    flush=True,
                )
    report = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "context": args.context,
        "steps": args.steps,
        "rounds": args.rounds,
        "results": [],
    }
    first = next(iter(engines))
    for name, llm in engines.items():
        compiled_steps = getattr(llm.engine.executor.runner.graph_runner, "steps", 0)
        for batch in batches:
            rates = samples[(name, batch)]
            row = {
                "mode": name,
                "batch": batch,
                "decode_tok_s_median": round(statistics.median(rates), 1),
                "decode_tok_s_range": [round(min(rates), 1), round(max(rates), 1)],
                "vs_hybrid_eager": round(
                    statistics.median(rates) / statistics.median(samples[("hybrid eager", batch)]),
                    2,
                ),
                "same_tokens_as_hybrid_compiled": tokens[(name, batch)] == tokens[(first, batch)],
                "compiled_steps": compiled_steps - counters[name],
            }
            report["results"].append(row)
            print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
