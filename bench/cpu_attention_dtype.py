"""The eager CPU attention backend in bf16: computed in bf16 against computed in fp32.

One call is one layer's ``CpuPagedAttention.forward`` (the step's plan built beforehand:
``prepare`` runs once per step for every layer), with SmolLM2-135M's heads (9 query
heads, 3 KV heads, head size 64), block size 16, a bf16 cache and bf16 queries. Steps:

* ``decode1``/``decode16``/``decode64``: that many sequences of 512 tokens, one query
  token each (what the eager path runs when a step is not served by the compiled decode);
* ``mixed``: a 256-token prompt (one prefill chunk) and 32 decodes of 512 tokens, the
  step that runs eagerly whenever a new request arrives under load;
* ``prefill256``: that prompt alone (a new request on an idle server).

Each sequence's blocks are consecutive in the cache, as the engine allocates them to a
fresh sequence. Modes:

* ``base``: the backend as it was at ``--base-rev`` (default: the commit before the fp32
  compute), loaded from git into a package of its own: bf16 matmuls, no decode chunks;
* ``bf16``: today's backend with ``compute_dtype`` forced to bf16;
* ``fp32_whole``: fp32 compute with each decode group attended at once (no chunks);
* ``auto``: today's backend as it chooses on this CPU (``attention_compute_dtype``:
  fp32 where bf16 is not native; decode groups in chunks of ``DECODE_CHUNK_BYTES``).

``compute_dtype`` applies to decode groups of several sequences only: since 68a1546 the
prefill rows stay in the cache's dtype in every mode (bench/RESULTS.md says why), so
``prefill256`` and the prefill part of ``mixed`` measure the same computation in every
mode but ``base``; the 1f10b18 results under bench/results were taken before that.

Every (threads, mode, step) case runs once per round, in a shuffled order, so load from
other processes falls on every mode; a case's figure is the median over rounds of its
per-round medians, with the range of those medians as the noise. Every mode's output is
checked against an fp32 reference first.

    python bench/cpu_attention_dtype.py --rounds 7 --threads 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tessellm_attention_cpu.backend as backend_module
from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm_attention_cpu import precision

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "plugins/attention_cpu/src/tessellm_attention_cpu"
BASE_REV = "0ae61af"  # the last commit before the fp32 compute

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 16
CONTEXT = 512
# (tokens already cached, query tokens) per sequence.
STEPS: dict[str, list[tuple[int, int]]] = {
    "decode1": [(CONTEXT - 1, 1)],
    "decode16": [(CONTEXT - 1, 1)] * 16,
    "decode64": [(CONTEXT - 1, 1)] * 64,
    "mixed": [(0, 256)] + [(CONTEXT - 1, 1)] * 32,
    "prefill256": [(0, 256)],
}
MODES = ("base", "bf16", "fp32_whole", "auto")


def load_base(rev: str):
    """The backend module at git revision ``rev``, importable beside today's (its own
    package name, its imports of the package rewritten)."""
    root = Path(tempfile.mkdtemp(prefix="attention_cpu_base_"))
    package = root / "tessellm_attention_cpu_base"
    package.mkdir()
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:{PACKAGE}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    for name in listing.stdout.split():
        if name.endswith(".py"):
            source = subprocess.run(
                ["git", "show", f"{rev}:{PACKAGE}/{name}"],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            text = source.replace("tessellm_attention_cpu.", "tessellm_attention_cpu_base.")
            (package / name).write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("tessellm_attention_cpu_base.backend")


class Step:
    """A step's bf16 query and caches, its metadata with the plan prepared, and the
    fp32 reference output."""

    def __init__(self, seqs: list[tuple[int, int]], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        seq_lens = [cached + q for cached, q in seqs]
        q_lens = [q for _, q in seqs]
        per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
        width = max(per_seq)
        tables = torch.zeros((len(seqs), width), dtype=torch.int32)  # block 0: spare
        slots, next_block = [], 1
        for s, (n, nb) in enumerate(zip(seq_lens, per_seq, strict=True)):
            tables[s, :nb] = torch.arange(next_block, next_block + nb, dtype=torch.int32)
            next_block += nb
            pos = torch.arange(n - q_lens[s], n)
            slots.append(tables[s, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
        shape = (next_block, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
        self.k_cache = torch.randn(shape, generator=gen).bfloat16()
        self.v_cache = torch.randn(shape, generator=gen).bfloat16()
        self.query = torch.randn((sum(q_lens), HEADS, HEAD_SIZE), generator=gen).bfloat16()
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.seqs, self.tables, self.starts, self.lens = seqs, tables, starts, lens
        self.metadata = AttentionMetadata(
            query_start_loc=starts,
            seq_lens=lens,
            block_tables=tables,
            slot_mapping=torch.cat(slots),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=lens,
        )
        self.scale = HEAD_SIZE**-0.5
        self.expected = self.reference()

    def reference(self) -> torch.Tensor:
        """Per sequence in fp32: its context through the block table, causal."""
        out, group = [], HEADS // KV_HEADS
        for s, (cached, q_len) in enumerate(self.seqs):
            n = cached + q_len
            blocks = self.tables[s].long()
            k = self.k_cache[blocks].reshape(-1, KV_HEADS, HEAD_SIZE)[:n].float()
            v = self.v_cache[blocks].reshape(-1, KV_HEADS, HEAD_SIZE)[:n].float()
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            start = int(self.starts[s])
            q = self.query[start : start + q_len].float()
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
            visible = torch.arange(n)[None, :] <= torch.arange(cached, n)[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        return torch.cat(out)


NO_CHUNKS = 1 << 62
DEFAULT_CHUNK_BYTES = backend_module.DECODE_CHUNK_BYTES


class Case:
    """One layer's attention call by ``mode``'s backend on ``step``, the step's plan
    prepared once beforehand (the engine prepares once per step for every layer)."""

    def __init__(self, step: Step, mode: str, base_module) -> None:
        spec = AttentionSpec("cpu", torch.bfloat16, HEAD_SIZE, HEADS, KV_HEADS, BLOCK_SIZE)
        module = base_module if mode == "base" else backend_module
        self.backend = module.CpuPagedAttention(spec)
        if mode in ("bf16", "fp32_whole"):
            self.backend.compute_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        self.chunk_bytes = NO_CHUNKS if mode == "fp32_whole" else DEFAULT_CHUNK_BYTES
        self.step = step
        self.metadata = dataclasses.replace(step.metadata, extra={})
        self.backend.prepare(self.metadata)

    def __call__(self) -> torch.Tensor:
        step = self.step
        return self.backend.forward(
            step.query, step.k_cache, step.v_cache, self.metadata, scale=step.scale
        )


def time_calls(call, budget_s: float, min_calls: int) -> list[float]:
    """Microseconds per call: a few warm-up calls, then at least ``min_calls`` and as
    many as fit in ``budget_s``."""
    for _ in range(3):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def summary(rows: list[dict], threads: list[int], modes: list[str], steps: list[str]) -> str:
    """A markdown table: per (threads, step), each mode's median of per-round medians
    (range), and the first mode's time over the last's."""
    lines = [
        "| threads | step | "
        + " | ".join(f"{m} ms" for m in modes)
        + f" | {modes[0]}/{modes[-1]} |",
        "|---|---|" + "---|" * (len(modes) + 1),
    ]
    for n_threads, name in ((t, n) for t in threads for n in steps):
        mids, cells = [], []
        for mode in modes:
            meds = [
                r["median_ms"]
                for r in rows
                if (r.get("threads"), r["step"], r["mode"]) == (n_threads, name, mode)
                and "median_ms" in r
            ]
            mids.append(statistics.median(meds))
            cells.append(f"{mids[-1]:.2f} ({min(meds):.2f}-{max(meds):.2f})")
        ratio = f"{mids[0] / mids[-1]:.2f}x" if len(mids) > 1 else ""
        lines.append(f"| {n_threads} | {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=0.5, help="per case and round")
    parser.add_argument("--min-calls", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--base-rev", default=BASE_REV)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    base_module = load_base(args.base_rev) if "base" in args.modes else None
    auto = precision.attention_compute_dtype(torch.bfloat16)
    print(
        f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"auto computes bf16 in {auto}, decode chunks of {DEFAULT_CHUNK_BYTES >> 20} MiB, "
        f"base {args.base_rev}, load {os.getloadavg()[0]:.2f}"
    )
    steps = {name: Step(STEPS[name], seed) for seed, name in enumerate(args.steps)}
    cases = {
        (mode, name): Case(steps[name], mode, base_module)
        for name in args.steps
        for mode in args.modes
    }
    keys = [(t, mode, name) for t in args.threads for mode, name in cases]
    rows: list[dict] = []
    rng = random.Random(0)
    with torch.inference_mode():
        for (mode, name), case in cases.items():
            backend_module.DECODE_CHUNK_BYTES = case.chunk_bytes
            err = (case().float() - steps[name].expected).abs().max().item()
            rows.append({"mode": mode, "step": name, "max_abs_err_vs_fp32": err})
            print(json.dumps(rows[-1]), flush=True)
        for round_index in range(args.rounds):
            order = keys[:]
            rng.shuffle(order)
            for n_threads, mode, name in order:
                case = cases[mode, name]
                torch.set_num_threads(n_threads)
                backend_module.DECODE_CHUNK_BYTES = case.chunk_bytes
                times = time_calls(case, args.budget_s, args.min_calls)
                row = {
                    "round": round_index,
                    "threads": n_threads,
                    "mode": mode,
                    "step": name,
                    "median_ms": statistics.median(times) / 1e3,
                    "calls": len(times),
                    "load_1m": os.getloadavg()[0],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    backend_module.DECODE_CHUNK_BYTES = DEFAULT_CHUNK_BYTES
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(summary(rows, args.threads, args.modes, args.steps))


if __name__ == "__main__":
    main()
