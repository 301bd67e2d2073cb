"""Where a step's time goes on a CUDA GPU, for bench/RESULTS.md.

``decode``: one request (512 prompt tokens) decoded at batch 1. Reports the median wall
time per step, the GPU time of the captured forward alone (graph replays timed with CUDA
events), of the LM head, and the memory-bandwidth floor: bytes the step must read (every
weight but the embedding table, plus the KV cache) over the card's copy bandwidth
measured in the same process.

``cpu-share``: a throughput workload; once decode steps run with ``--batch`` sequences,
a window of steps is traced (CUDA activity only) and the share of wall time the GPU is
idle, i.e. waiting on the host, is reported.

    python bench/cuda_steps.py decode --model random:llama-3-8b --json out.json
    python bench/cuda_steps.py cpu-share --model random:qwen3-0.6b --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from tessellm.bench.workload import LengthRange, make_workload, usable_token_ids
from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.sampling_params import SamplingParams


def events_ms(fn, reps: int = 30, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_tb_per_s() -> float:
    src = torch.randn(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = events_ms(lambda: dst.copy_(src), reps=10)
    return 2 * 2**31 / (ms * 1e-3) / 1e12


KERNEL_GROUPS = (  # first match wins: cuBLAS's "splitKreduce" is a matmul, not attention
    ("matmul", ("gemv", "gemm", "cutlass", "nvjet", "sm90", "xmma", "splitk")),
    ("norm", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("silu_and_mul", ("silu",)),
    ("write_kv", ("write_kv",)),
    ("attention", ("decode", "reduce", "prefill", "attention")),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, needles in KERNEL_GROUPS:
        if any(n in low for n in needles):
            return group
    return "other"


def kernel_breakdown(fn, reps: int) -> dict[str, float]:
    """GPU time per call of ``fn`` by kernel group (and count), from a CUDA-only trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    names: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        duration = event.time_range.end - event.time_range.start
        group = kernel_group(event.name)
        groups[group] = groups.get(group, 0.0) + duration / reps
        groups[f"{group}_count"] = groups.get(f"{group}_count", 0) + 1 / reps
        names[event.name[:80]] = names.get(event.name[:80], 0.0) + duration / reps
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {**groups, "top": dict(top)}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def prompt_ids(engine: LLMEngine, count: int, lengths: str, outputs: str, seed: int):
    vocab = engine.model_config.vocab_size
    ids = usable_token_ids(vocab, engine.tokenizer.all_special_ids)
    return make_workload(
        count, LengthRange.parse(lengths), LengthRange.parse(outputs), ids, seed=seed
    )


def warmed_up_prompt(engine: LLMEngine, prompt_len: int, new_tokens: int) -> list[int]:
    """The batch-1 decode benchmarks' prompt (seed 1), once a short untimed request has run
    so that the timed one pays no first-call costs."""
    prompt = prompt_ids(engine, 1, str(prompt_len), str(new_tokens), seed=1)[0].prompt_token_ids
    engine.add_request("warm", prompt[:32], greedy(8))
    while engine.has_unfinished_requests():
        engine.step()
    return prompt


@torch.inference_mode()
def decode_breakdown(
    model: str, prompt_len: int, new_tokens: int, min_split_tokens: int | None = None
) -> dict[str, float]:
    if min_split_tokens is not None:
        # An experiment on the Triton backend's split heuristic (its own class knob).
        from tessellm_attention_triton.backend import TritonPagedAttention

        TritonPagedAttention.min_split_tokens = min_split_tokens
    args = EngineArgs(model=model, max_model_len=prompt_len + new_tokens + 16, max_num_seqs=8)
    engine = LLMEngine(args)
    runner = engine.executor.runner
    prompt = warmed_up_prompt(engine, prompt_len, new_tokens)
    engine.add_request("r", prompt, greedy(new_tokens))
    walls = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    decode_walls = walls[1:]  # the first step is the prefill
    out: dict[str, float] = {
        "fused_ops": os.environ.get("TESSELLM_FUSED_OPS", "all"),
        "min_split_tokens": min_split_tokens or "backend default",
        "step_wall_ms": statistics.median(decode_walls) * 1e3,
        "decode_tok_s": 1 / statistics.median(decode_walls),
    }
    if runner.graph_runner is not None:
        graph, hidden = runner.graph_runner.graphs[1]
        out["graph_forward_ms"] = events_ms(graph.replay)
        out["lm_head_ms"] = events_ms(lambda: runner.model.compute_logits(hidden[:1]))
        out["forward_kernels_us"] = kernel_breakdown(graph.replay, reps=10)
    # A step reads every weight in full but the embedding table (one row of it), and the
    # KV cache of the context (counted at the middle of the generation). Buffers such as
    # the rotary tables are read only at the step's positions: not counted.
    tied = bool(getattr(runner.config, "tie_word_embeddings", False))  # the LM head reads it
    weights = sum(
        p.numel() * p.element_size()
        for name, p in runner.model.named_parameters()  # tied weights appear once
        if tied or "embed_tokens" not in name
    )
    context = prompt_len + new_tokens // 2
    kv_bytes = runner.bytes_per_block() * context // runner.block_size
    out["bytes_per_step"] = weights + kv_bytes
    engine.shutdown()
    return out


def host_profile(engine: LLMEngine, steps: int, last_plan: dict) -> None:
    """Where the host's time goes in ``steps`` steps (cProfile), printed to stdout."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    print(f"host profile of {steps} steps, last batch {last_plan.get('seqs')} sequences:")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


@torch.inference_mode()
def cpu_share(model: str, num_prompts: int, batch: int, window: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    args = EngineArgs(model=model, max_model_len=2048, max_num_seqs=batch)
    engine = LLMEngine(args)
    runner = engine.executor.runner
    requests = prompt_ids(engine, num_prompts, "100:1024", "100:1024", seed=0)
    last_plan = {}
    launch = runner.launch  # every step goes through it (``execute`` too)

    def recording_launch(plan, *args):
        last_plan["seqs"] = len(plan.seqs)
        last_plan["decode"] = plan.num_batched_tokens == len(plan.seqs)
        return launch(plan, *args)

    runner.launch = recording_launch
    for i, req in enumerate(requests):
        engine.add_request(str(i), req.prompt_token_ids, greedy(req.output_len))
    start = time.perf_counter()
    steps = generated = 0
    traced = None
    while engine.has_unfinished_requests():
        full_decode = last_plan.get("decode") and last_plan.get("seqs") == batch
        if traced is None and full_decode:
            torch.cuda.synchronize()
            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
            t0 = time.perf_counter()
            seqs_seen = []
            for _ in range(window):
                for out in engine.step():
                    generated += len(out.outputs[0].token_ids) if out.finished else 0
                seqs_seen.append(last_plan["seqs"])
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            prof.__exit__(None, None, None)
            traced = (prof, wall, seqs_seen)
            host_profile(engine, window, last_plan)
            continue
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        steps += 1
    elapsed = time.perf_counter() - start
    if traced is None:
        raise SystemExit(f"no decode step ran with {batch} sequences")
    prof, wall, seqs_seen = traced
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy_us, cur_start, cur_end = 0.0, None, None
    for s, e in intervals:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy_us += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        busy_us += cur_end - cur_start
    return {
        "requests": num_prompts,
        "elapsed_s": elapsed,
        "output_tok_s_incl_traced_window": generated / elapsed,
        "window_steps": window,
        "window_min_seqs": min(seqs_seen),
        "window_wall_ms_per_step": wall / window * 1e3,
        "window_gpu_busy_ms_per_step": busy_us / 1e3 / window,
        "cpu_share": 1 - busy_us / 1e6 / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["decode", "cpu-share"])
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--min-split-tokens", type=int, help="Triton decode split experiment")
    parser.add_argument("--json")
    args = parser.parse_args()
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0), "model": args.model}
    if args.what == "decode":
        result["copy_tb_per_s"] = copy_tb_per_s()
        result.update(
            decode_breakdown(args.model, args.prompt_len, args.new_tokens, args.min_split_tokens)
        )
        floor_ms = result["bytes_per_step"] / (result["copy_tb_per_s"] * 1e12) * 1e3
        result["roofline_tok_s"] = 1e3 / floor_ms
        result["roofline_fraction"] = result["decode_tok_s"] / result["roofline_tok_s"]
    else:
        result.update(cpu_share(args.model, args.num_prompts, args.batch, args.window))
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
