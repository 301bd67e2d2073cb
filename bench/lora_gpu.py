"""Multi-LoRA decode throughput on a GPU: batches mixing 0, 8 and 64 rank-16 adapters
against the base model alone (issue 19's target: >= 80% of the base's throughput at 8).

    python bench/lora_gpu.py --model random:llama-3-8b --adapters 0,8,64 --rank 16 \
        --num-prompts 64 --input-len 128 --output-len 128 --rounds 3 --json lora_gpu.json

No hub: ``random:`` weights, and adapters written here with random ``A``/``B`` on every
projection (``tessellm.testing.lora``). ``--files`` distinct adapter files are written (8
by default) and cycled through under distinct adapter ids, so 64 adapters are 64 slots
and 64 host copies, as 64 different files would be, without 64 files on disk.

Two engines, one after the other: the base model (``enable_lora`` off), then one with
``enable_lora`` and ``max_loras`` = the most adapters asked for, which runs every mix
(0 adapters: ``enable_lora`` on, no request uses one). Each measurement is two runs on
fresh random prompts (no prefix-cache hits): ``max_tokens=1`` (prefill) and
``max_tokens=output_len``; decode throughput is ``num_prompts * (output_len - 1)`` over
the difference. Rounds alternate the mixes; medians are reported.

``--lora-kernels off`` runs the torch LoRA path (every other fused op kept), for the A/B
against the Triton kernels (steps with adapters then run eagerly: only the kernels have
CUDA graphs); ``--enforce-eager`` turns CUDA graphs off on both engines; ``--one-at-a-time``
also runs each mix of at most 8 adapters as one batch per adapter, one after another.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def model_config(model: str) -> dict[str, Any]:
    from tessellm.sources.random_weights import PREFIX, PRESETS

    if model.startswith(PREFIX):
        return PRESETS[model.removeprefix(PREFIX)]
    return json.loads((Path(model) / "config.json").read_text())


def make_adapters(config: dict[str, Any], files: int, rank: int, out: str) -> list[str]:
    import torch

    from tessellm.testing.lora import write_random_adapter

    return [
        write_random_adapter(
            config, Path(out) / f"adapter{i}", rank, seed=i, std=0.02, dtype=torch.bfloat16
        )
        for i in range(files)
    ]


class Workload:
    def __init__(self, args: argparse.Namespace, vocab_size: int) -> None:
        self.args = args
        self.rng = random.Random(0)
        self.top = min(30000, vocab_size - 1)

    def prompts(self) -> list[dict[str, list[int]]]:
        """Fresh random prompts: no run reuses another's KV through the prefix cache."""
        n, length = self.args.num_prompts, self.args.input_len
        return [
            {"prompt_token_ids": [self.rng.randrange(10, self.top) for _ in range(length)]}
            for _ in range(n)
        ]

    def timed(self, llm, loras, max_tokens: int, prompts=None) -> float:
        from tessellm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        prompts = prompts or self.prompts()
        start = time.perf_counter()
        llm.generate(prompts, params, lora_request=loras)
        return time.perf_counter() - start

    def decode_tok_s(self, llm, loras) -> dict[str, float]:
        """Decode throughput of one batch: (full run - prefill run) over the decode tokens."""
        out_len = self.args.output_len
        prefill = self.timed(llm, loras, 1)
        full = self.timed(llm, loras, out_len)
        tokens = self.args.num_prompts * (out_len - 1)
        return {
            "decode_tok_s": tokens / max(full - prefill, 1e-9),
            "prefill_s": prefill,
            "full_s": full,
        }

    def one_at_a_time(self, llm, loras) -> dict[str, float]:
        """Each adapter's share of the prompts as its own batch, one after another."""
        out_len, adapters = self.args.output_len, sorted(set(loras), key=lambda r: r.lora_int_id)
        prefill = full = 0.0
        for lora in adapters:
            share = [i for i, r in enumerate(loras) if r == lora]
            prompts = self.prompts()
            prefill += self.timed(llm, [lora] * len(share), 1, [prompts[i] for i in share])
            full += self.timed(llm, [lora] * len(share), out_len, [prompts[i] for i in share])
        tokens = self.args.num_prompts * (out_len - 1)
        return {"decode_tok_s": tokens / max(full - prefill, 1e-9), "prefill_s": prefill,
                "full_s": full}  # fmt: skip


def build(args: argparse.Namespace, enable_lora: bool):
    from tessellm import LLM

    kwargs: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.input_len + args.output_len + 16,
        "max_num_seqs": args.num_prompts,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.enforce_eager,
    }
    if enable_lora:
        most = max(args.adapter_counts)
        kwargs.update(enable_lora=True, max_loras=max(1, most), max_lora_rank=args.rank,
                      max_cpu_loras=max(1, most))  # fmt: skip
    return LLM(**kwargs)


def release(llm) -> None:
    import torch

    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--adapters", default="0,8,64", help="adapter counts to mix")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--files", type=int, default=8, help="distinct adapter files")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--lora-kernels", choices=["on", "off"], default="on")
    parser.add_argument("--one-at-a-time", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.adapter_counts = [int(c) for c in args.adapters.split(",") if c.strip()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.lora_kernels == "off":
        from tessellm_triton_kernels.ops import ALL_OPS

        others = [name for name in ALL_OPS if not name.startswith("lora_")]
        os.environ["TESSELLM_FUSED_OPS"] = ",".join(others)

    import torch
    import triton

    from tessellm.lora import LoRARequest

    work = Workload(args, model_config(args.model)["vocab_size"])
    samples: dict[str, list[dict[str, float]]] = {"base": []}
    started = time.perf_counter()
    llm = build(args, enable_lora=False)
    engine_base = llm.engine.describe()
    work.timed(llm, None, 4)  # warm-up
    for _ in range(args.rounds):
        samples["base"].append(work.decode_tok_s(llm, None))
    release(llm)

    tmp = tempfile.mkdtemp(prefix="lora-gpu-bench-")
    most = max(args.adapter_counts)
    paths = make_adapters(model_config(args.model), min(args.files, max(most, 1)), args.rank, tmp)
    loras = [LoRARequest(f"a{i}", i + 1, paths[i % len(paths)]) for i in range(most)]
    mixes = {
        count: [loras[i % count] if count else None for i in range(args.num_prompts)]
        for count in args.adapter_counts
    }
    llm = build(args, enable_lora=True)
    engine_lora = llm.engine.describe()
    load_start = time.perf_counter()
    for mix in mixes.values():  # warm-up: adapters into slots, kernels compiled
        work.timed(llm, mix, 4)
    warm_s = time.perf_counter() - load_start
    for round_index in range(args.rounds):
        for count, mix in mixes.items():
            samples.setdefault(f"{count} adapters", []).append(work.decode_tok_s(llm, mix))
            if args.one_at_a_time and 0 < count <= 8:
                key = f"{count} adapters, one at a time"
                samples.setdefault(key, []).append(work.one_at_a_time(llm, mix))
        last = {k: v[-1]["decode_tok_s"] for k, v in samples.items() if len(v) > round_index}
        print(f"round {round_index}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in last.items()))
    release(llm)

    median = {k: statistics.median(s["decode_tok_s"] for s in v) for k, v in samples.items()}
    base = median["base"]
    report = {
        # A CPU run is a smoke test of the script, not a measurement.
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "adapter_counts"},
        "engine_base": engine_base,
        "engine_lora": engine_lora,
        "adapter_warm_up_s": round(warm_s, 1),
        "decode_tok_s_median": {k: round(v, 1) for k, v in median.items()},
        "ratio_to_base": {k: round(v / base, 3) for k, v in median.items()},
        "rounds": samples,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({k: report[k] for k in ("device", "decode_tok_s_median", "ratio_to_base")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
