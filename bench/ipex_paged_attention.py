"""Paged-attention decode: IPEX's CPU op against tessellm's CPU backend, per layer call.

IPEX (intel-extension-for-pytorch 2.8) pins torch 2.8, so it lives in a venv of its own
and each implementation is timed in a subprocess of its venv's python. ``compare`` runs
every (implementation, dtype, batch, threads) case once per round, in a shuffled order,
for several rounds, so that load from other processes on the machine falls on both
sides; it reports each case's median over rounds of the per-round medians, and the
spread of those per-round medians as the noise.

One call is one layer's decode attention: 9 query heads, 3 KV heads, head size 64
(SmolLM2-135M), block size 16, contexts of 496 to 528 tokens (each sequence's blocks
consecutive, as the engine allocates them to a fresh sequence). tessellm's backend is
timed on ``forward`` with the step's plan built beforehand (``prepare`` runs once per
step for all 30 layers; its own time is reported apart). IPEX's op
(``ipex.llm.modules.PagedAttention.single_query_cached_kv_attention``) is timed on its
own cache layout ``[blocks, kv_heads, block_size, head_size]`` and, as ``ipex_shared``,
on tessellm's ``[blocks, block_size, kv_heads, head_size]`` cache handed over as a
permuted view (what a plugin would have to pass, the layout being the shared contract).
``tessellm_traced`` (not in ``compare``'s default set: each run compiles for a while) is
the attention of the CPU platform's compiled decode steps, ``traced_decode``, compiled
alone by inductor. Every implementation's output is checked against an fp32 reference.
Results and the set-up of the IPEX venv: docs/cpu.md.

    python bench/ipex_paged_attention.py compare --ipex-python /tmp/ipex-venv/bin/python
    python bench/ipex_paged_attention.py compare --ipex-python /tmp/ipex-venv/bin/python \
        --rounds 3 --budget-s 0.5 --impls tessellm_traced tessellm ipex
    python bench/ipex_paged_attention.py run --impl tessellm --batch 16 --dtype bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 16
CONTEXT_MIN, CONTEXT_MAX = 496, 528
IMPLS = ("tessellm", "ipex", "ipex_shared")
# Not in compare's default set (each run compiles for a minute on two cores).
EXTRA_IMPLS = ("tessellm_traced",)
DTYPES = ("bf16", "fp32")


def make_inputs(torch, batch: int, dtype_name: str) -> dict:
    """The same seeded tensors on either torch: queries, a zero-padded cache in tessellm's
    layout, consecutive blocks per sequence, and the context lengths."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(1234 + batch)
    width = -(-CONTEXT_MAX // BLOCK_SIZE)
    num_blocks = batch * width + 1  # block 0 unused, as a pool always has spares
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn((batch, HEADS, HEAD_SIZE), generator=gen).to(dtype)
    lens = torch.randint(CONTEXT_MIN, CONTEXT_MAX + 1, (batch,), generator=gen).int()
    tables = (1 + torch.arange(batch * width).view(batch, width)).int()
    return {"query": query, "k": k_cache, "v": v_cache, "lens": lens, "tables": tables}


def reference(torch, inp: dict, scale: float):
    """Per sequence, in fp32: gather the context through the block table and attend."""
    out = []
    group = HEADS // KV_HEADS
    for s, length in enumerate(inp["lens"].tolist()):
        blocks = inp["tables"][s].long()
        k = inp["k"][blocks].reshape(-1, KV_HEADS, HEAD_SIZE)[:length].float()
        v = inp["v"][blocks].reshape(-1, KV_HEADS, HEAD_SIZE)[:length].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", inp["query"][s].float(), k) * scale
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def tessellm_call(torch, inp: dict, scale: float):
    """A callable running one layer's decode through tessellm's CPU backend, and the
    time of the step's ``prepare`` (median of 20)."""
    from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
    from tessellm_attention_cpu.backend import CpuPagedAttention

    query = inp["query"]
    batch = query.shape[0]
    spec = AttentionSpec("cpu", query.dtype, HEAD_SIZE, HEADS, KV_HEADS, BLOCK_SIZE)
    backend = CpuPagedAttention(spec)
    lens, tables = inp["lens"], inp["tables"]
    slots = tables.long()[torch.arange(batch), (lens.long() - 1) // BLOCK_SIZE]
    slots = slots * BLOCK_SIZE + (lens.long() - 1) % BLOCK_SIZE

    def metadata() -> AttentionMetadata:
        starts = torch.arange(batch + 1, dtype=torch.int32)
        return AttentionMetadata(
            query_start_loc=starts,
            seq_lens=lens,
            block_tables=tables,
            slot_mapping=slots,
            max_query_len=1,
            max_seq_len=int(lens.max()),
            query_start_loc_cpu=starts,
            seq_lens_cpu=lens,
        )

    prepare_s = []
    for _ in range(20):
        md = metadata()
        start = time.perf_counter()
        backend.prepare(md)
        prepare_s.append(time.perf_counter() - start)
    md = metadata()
    backend.prepare(md)

    def call():
        return backend.forward(query, inp["k"], inp["v"], md, scale=scale)

    return call, statistics.median(prepare_s)


def tessellm_traced_call(torch, inp: dict, scale: float):
    """The decode attention the CPU platform's compiled steps run (``traced_decode``,
    traced into the step's graph), here compiled alone by inductor with the dimensions
    the step's export leaves dynamic (sequences, table width, cache blocks)."""
    from tessellm_attention_cpu.traced import traced_decode

    compiled = torch.compile(traced_decode, fullgraph=True)
    args = (inp["query"], inp["k"], inp["v"], inp["tables"], inp["lens"], scale, None, None)
    for tensor, dims in ((args[0], (0,)), (args[1], (0,)), (args[2], (0,)), (args[3], (0, 1))):
        for dim in dims:
            torch._dynamo.mark_dynamic(tensor, dim)
    torch._dynamo.mark_dynamic(args[4], 0)

    def call():
        return compiled(*args)

    return call, None


def ipex_call(torch, inp: dict, scale: float, shared_layout: bool):
    from intel_extension_for_pytorch.llm.modules import PagedAttention

    query = inp["query"]
    # IPEX's layout is [blocks, kv_heads, block_size, head_size]: tessellm's cache as a
    # permuted view (shared_layout), or copied into that layout once.
    k = inp["k"].permute(0, 2, 1, 3)
    v = inp["v"].permute(0, 2, 1, 3)
    if not shared_layout:
        k, v = k.contiguous(), v.contiguous()
    head_mapping = torch.arange(KV_HEADS, dtype=torch.int32).repeat_interleave(HEADS // KV_HEADS)
    out = torch.empty_like(query)
    max_len = int(inp["lens"].max())

    def call():
        PagedAttention.single_query_cached_kv_attention(
            out, query, k, v, head_mapping, scale, inp["tables"], inp["lens"], BLOCK_SIZE,
            max_len, None,
        )  # fmt: skip
        return out

    return call, None


def time_calls(call, budget_s: float, min_calls: int, max_calls: int) -> list[float]:
    for _ in range(10):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < deadline):
        start = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def run_case(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    inp = make_inputs(torch, args.batch, args.dtype)
    scale = HEAD_SIZE**-0.5
    if args.impl == "tessellm":
        call, prepare_s = tessellm_call(torch, inp, scale)
    elif args.impl == "tessellm_traced":
        call, prepare_s = tessellm_traced_call(torch, inp, scale)
    else:
        call, prepare_s = ipex_call(torch, inp, scale, args.impl == "ipex_shared")
    with torch.inference_mode():
        err = (call().float() - reference(torch, inp, scale)).abs().max().item()
        times = time_calls(call, args.budget_s, args.min_calls, args.max_calls)
    q1, med, q3 = statistics.quantiles(times, n=4)
    return {
        "impl": args.impl,
        "dtype": args.dtype,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_us": med,
        "q1_us": q1,
        "q3_us": q3,
        "calls": len(times),
        "max_abs_err_vs_fp32": err,
        "prepare_us": None if prepare_s is None else prepare_s * 1e6,
        "load_1m": os.getloadavg()[0],
    }


def compare(args: argparse.Namespace) -> None:
    pythons = {"tessellm": sys.executable, "tessellm_traced": sys.executable}
    pythons.update(ipex=args.ipex_python, ipex_shared=args.ipex_python)
    cases = list(itertools.product(args.impls, args.dtypes, args.batches, args.threads))
    results: dict[tuple, list[dict]] = {case: [] for case in cases}
    rng = random.Random(0)
    for round_index in range(args.rounds):
        order = cases[:]
        rng.shuffle(order)
        for impl, dtype, batch, threads in order:
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            cmd = [pythons[impl], __file__, "run", "--impl", impl, "--dtype", dtype]
            cmd += ["--batch", str(batch), "--threads", str(threads)]
            cmd += ["--budget-s", str(args.budget_s)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["round"] = round_index
            results[(impl, dtype, batch, threads)].append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| dtype | batch | threads | " + " | ".join(f"{i} us" for i in args.impls) + " |")
    print("|---|---|---|" + "---|" * len(args.impls))
    for dtype, batch, threads in itertools.product(args.dtypes, args.batches, args.threads):
        cells = []
        for impl in args.impls:
            meds = [r["median_us"] for r in results[(impl, dtype, batch, threads)]]
            # Noise: the spread of the per-round medians around their median.
            mid = statistics.median(meds)
            cells.append(f"{mid:.1f} ({min(meds):.1f}-{max(meds):.1f})")
        print(f"| {dtype} | {batch} | {threads} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="time one case in this interpreter, print one JSON line")
    run.add_argument("--impl", choices=IMPLS + EXTRA_IMPLS, required=True)
    run.add_argument("--dtype", choices=DTYPES, default="bf16")
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--budget-s", type=float, default=1.0)
    run.add_argument("--min-calls", type=int, default=50)
    run.add_argument("--max-calls", type=int, default=5000)
    cmp = sub.add_parser("compare", help="interleave every case over several rounds")
    cmp.add_argument("--ipex-python", required=True, help="python of the venv with IPEX")
    cmp.add_argument("--rounds", type=int, default=3)
    cmp.add_argument("--budget-s", type=float, default=1.0)
    cmp.add_argument("--impls", nargs="+", choices=IMPLS + EXTRA_IMPLS, default=list(IMPLS))
    cmp.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    cmp.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    cmp.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    if args.command == "run":
        print(json.dumps(run_case(args)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
