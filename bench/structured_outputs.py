"""What structured outputs cost: per-step overhead and grammar compile time (issue 15).

Overhead: the same batch of requests (random prompts, every request generating exactly
``--output-len`` tokens) runs unconstrained and constrained by a JSON schema that cannot
be complete before that many tokens (an object whose array needs ``--min-items`` strings),
so both runs take the same number of steps; the figure is the constrained run's extra
wall time per step. Runs alternate (plain, json, plain, json, ...) and the best of each is
kept, so a slow moment of the machine does not land on one side only.

Compile time: 50 distinct schemas (nesting, enums, bounded arrays, numbers with bounds,
``additionalProperties: false``) compiled by a fresh backend one after another
(uncached), then requested again (cached: the engine's compile cache returns the future).

    python bench/structured_outputs.py --model smollm2-135m-instruct --batch 1 64 \
        --json bench/results/so.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from tessellm.bench.engine_run import EngineOptions, build_engine
from tessellm.sampling_params import SamplingParams, StructuredOutputsParams


def long_schema(min_items: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": min_items,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    }


def schema_family(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` distinct, bounded schemas of the shapes agents send."""
    rng = random.Random(seed)

    def leaf(i: int) -> dict[str, Any]:
        choice = rng.randrange(5)
        if choice == 0:
            return {"type": "integer", "minimum": -i, "maximum": 100 + i}
        if choice == 1:
            return {"type": "number", "minimum": 0, "maximum": i + 1}
        if choice == 2:
            return {"enum": [f"v{i}_{k}" for k in range(rng.randrange(2, 6))]}
        if choice == 3:
            return {"type": "string", "maxLength": 8 + i % 24}
        return {"type": "boolean"}

    def node(depth: int, i: int) -> dict[str, Any]:
        props = {}
        for k in range(rng.randrange(2, 6)):
            name = f"f{i}_{depth}_{k}"
            if depth < 2 and rng.random() < 0.3:
                props[name] = node(depth + 1, i)
            elif rng.random() < 0.2:
                props[name] = {"type": "array", "items": leaf(i), "maxItems": 3 + k}
            else:
                props[name] = leaf(i + k)
        return {
            "type": "object",
            "properties": props,
            "required": sorted(rng.sample(sorted(props), rng.randrange(1, len(props) + 1))),
            "additionalProperties": False,
        }

    return [node(0, i) for i in range(count)]


def run_batch(engine, prompts: list[list[int]], output_len: int, so: Any) -> tuple[float, int]:
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=so is None, structured_outputs=so
    )
    if so is not None:  # compile outside the timed part (measured separately below)
        engine.validate_structured(params)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}_{i}", ids, params)
    steps = 0
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        steps += 1
    elapsed = time.perf_counter() - start
    expected = len(prompts) * output_len
    if tokens != expected:
        raise SystemExit(f"expected {expected} tokens, got {tokens}: the runs are not comparable")
    return elapsed, steps


def overhead(engine, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(batch)
    top = min(engine.max_token_id, 20000)
    prompts = [[rng.randrange(100, top) for _ in range(args.input_len)] for _ in range(batch)]
    so = StructuredOutputsParams(json=long_schema(args.min_items), disable_any_whitespace=True)
    best = {"plain": float("inf"), "json": float("inf")}
    steps = {}
    for _ in range(args.repeats):
        for name, constraint in (("plain", None), ("json", so)):
            elapsed, n = run_batch(engine, prompts, args.output_len, constraint)
            best[name] = min(best[name], elapsed)
            steps[name] = n
    per_step = {k: best[k] / steps[k] * 1e3 for k in best}
    return {
        "batch": batch,
        "output_len": args.output_len,
        "steps": steps,
        "plain_ms_per_step": round(per_step["plain"], 3),
        "json_ms_per_step": round(per_step["json"], 3),
        "overhead_pct": round(100 * (best["json"] / best["plain"] - 1), 2),
        "plain_tok_s": round(batch * args.output_len / best["plain"], 1),
        "json_tok_s": round(batch * args.output_len / best["json"], 1),
    }


def compile_times(engine, backend: str | None) -> dict[str, Any]:
    schemas = schema_family(50)
    manager = engine.structured
    uncached = []
    for schema in schemas:
        so = StructuredOutputsParams(json=schema, backend=backend)
        start = time.perf_counter()
        manager.submit(so).result()
        uncached.append(time.perf_counter() - start)
    cached = []
    for schema in schemas:
        so = StructuredOutputsParams(json=schema, backend=backend)
        start = time.perf_counter()
        manager.submit(so).result()
        cached.append(time.perf_counter() - start)
    uncached.sort()
    cached.sort()
    return {
        "backend": backend or manager.backend_name(StructuredOutputsParams(json_object=True)),
        "schemas": len(schemas),
        "uncached_ms_p50": round(uncached[len(uncached) // 2] * 1e3, 2),
        "uncached_ms_max": round(uncached[-1] * 1e3, 2),
        "cached_ms_p50": round(cached[len(cached) // 2] * 1e3, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--min-items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", nargs="+", default=["xgrammar", "llguidance"])
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    options = EngineOptions(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=max(args.batch),
        max_model_len=args.input_len + args.output_len + 16,
    )
    engine = build_engine(options)
    report: dict[str, Any] = {
        "model": args.model,
        "engine": engine.describe(),
        "overhead": [],
        "compile": [],
    }
    for backend in args.backend:
        engine.structured.default_backend = backend
        for batch in args.batch:
            row = {"backend": backend, **overhead(engine, batch, args)}
            print(json.dumps(row))
            report["overhead"].append(row)
        row = compile_times(engine, backend)
        print(json.dumps(row))
        report["compile"].append(row)
    engine.shutdown()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
