"""Multi-LoRA throughput on one machine: a batch mixing N rank-r adapters against the
same batch on the base model alone (and, optionally, one adapter at a time), interleaved
rounds, medians.

    python bench/lora_cpu.py --hf-model /path/to/hf/folder --adapters 4 --rank 16 \
        --num-prompts 32 --input-len 64 --output-len 32 --rounds 3 --json out.json

``--hf-model`` is the base model as a Hugging Face folder (PEFT builds the random adapters
on it); ``--model`` is what tessellm serves (default: the same folder; e.g. the default
model's name, whose weights are the same network). Adapters get random B matrices (PEFT
initialises B to zero, which would change nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time


def make_adapters(hf_model: str, count: int, rank: int, out: str) -> list[str]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            init_lora_weights=False,
        )
        model = peft.get_peft_model(base, config)
        path = os.path.join(out, f"adapter{i}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def run(llm, prompts, loras, output_len: int) -> float:
    from tessellm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    return len(prompts) * output_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-model", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--one-at-a-time", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tessellm import LLM
    from tessellm.lora import LoRARequest

    tmp = tempfile.mkdtemp(prefix="lora-bench-")
    paths = make_adapters(args.hf_model, args.adapters, args.rank, tmp)
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)]
    llm = LLM(
        model=args.model or args.hf_model,
        dtype=args.dtype,
        enable_lora=True,
        max_loras=args.adapters,
        max_lora_rank=args.rank,
        max_num_seqs=args.num_prompts,
    )
    rng = random.Random(0)
    vocab = 1000
    prompts = [
        [rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)
    ]
    mixed = [loras[i % len(loras)] for i in range(len(prompts))]
    run(llm, prompts[:2], mixed[:2], 4)  # warm-up: adapters into slots, first allocations
    samples: dict[str, list[float]] = {"base": [], "mixed": []}
    if args.one_at_a_time:
        samples["one_adapter_at_a_time"] = []
    for round_index in range(args.rounds):
        samples["base"].append(run(llm, prompts, None, args.output_len))
        samples["mixed"].append(run(llm, prompts, mixed, args.output_len))
        if args.one_at_a_time:
            # Each adapter's share of the prompts as its own batch, one after another.
            share = len(prompts) // len(loras)
            start = time.perf_counter()
            for i, lora in enumerate(loras):
                part = prompts[i * share : (i + 1) * share]
                run(llm, part, [lora] * len(part), args.output_len)
            elapsed = time.perf_counter() - start
            samples["one_adapter_at_a_time"].append(share * len(loras) * args.output_len / elapsed)
        print(
            f"round {round_index}: "
            + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in samples.items())
        )
    base = statistics.median(samples["base"])
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "settings": vars(args),
        "engine": llm.engine.describe(),
        "output_tok_s_median": {k: round(statistics.median(v), 2) for k, v in samples.items()},
        "ratio_to_base": {k: round(statistics.median(v) / base, 3) for k, v in samples.items()},
        "rounds": samples,
    }
    print(json.dumps({k: report[k] for k in ("output_tok_s_median", "ratio_to_base")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
