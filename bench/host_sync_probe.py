"""Where does the host wait for the GPU in a batch-256 decode step? (CUDA runtime calls
with their Python stacks, from torch.profiler; run on a CUDA machine.)

    python bench/host_sync_probe.py --model random:qwen3-0.6b --batch 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from cuda_steps import greedy, prompt_ids

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    engine = LLMEngine(EngineArgs(model=args.model, max_model_len=2048, max_num_seqs=args.batch))
    print("overlap", engine.overlap_steps, "schedule_ahead", engine.schedule_ahead)
    for i, req in enumerate(prompt_ids(engine, args.batch, "100:1024", "300:1024", seed=0)):
        engine.add_request(str(i), req.prompt_token_ids, greedy(req.output_len))
    for _ in range(40):  # past the prefills
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"wall per step {wall / args.steps * 1e3:.2f} ms")
    table = prof.key_averages(group_by_stack_n=6).table(
        sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40
    )
    keep = [line for line in table.splitlines() if "cuda" in line.lower() or "Name" in line]
    print("\n".join(keep[:40]))
    for evt in prof.key_averages(group_by_stack_n=8):
        if evt.key.startswith(
            (
                "cudaStreamSynchronize",
                "cudaMemcpy",
                "cudaEventSynchronize",
                "cudaHostAlloc",
                "cudaDeviceSynchronize",
            )
        ) and (evt.self_cpu_time_total > 1000):
            print(f"\n{evt.key}: {evt.count} calls, {evt.self_cpu_time_total / 1e3:.1f} ms")
            print("\n".join("    " + s for s in evt.stack[:8]))


if __name__ == "__main__":
    main()
