"""Pipeline parallelism on the CPU: the cost of PP=2 against TP=2 and one process.

A random-weights Llama of a small real-ish shape (hidden 1024, 8 layers, fp32), the same
greedy batch through one process, TP=2 and PP=2 (mp over gloo; the ranks share the
machine's cores out, so every mode uses the same cores), in interleaved rounds so that
all modes see the same machine state. On a CPU the stages share the cores the one
process would use, so PP cannot win here: the figure is its overhead (the point-to-point
sends, a plan per stage, the driver's extra round trips), which the GPU run
(bench/run_pp_gpu.sh) puts beside real stage overlap.

    python bench/pp_cpu.py [--rounds 2] [--prompts 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from tessellm import LLM, SamplingParams
from tessellm.sources.random_weights import write_random_model

SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
MODES = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def run_mode(model: Path, tp: int, pp: int, prompts: list[list[int]], tokens: int) -> float:
    llm = LLM(
        model=str(model),
        dtype="float32",
        device="cpu",
        enforce_eager=True,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=512,
        kv_cache_memory_bytes=256 << 20,
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params)  # warm-up
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return len(prompts) * tokens / (time.perf_counter() - start)
    finally:
        llm.engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        parser.error("leave OMP_NUM_THREADS unset: the ranks share the cores out themselves")
    model = write_random_model(SHAPE, Path(tempfile.gettempdir()) / "tessellm-bench-pp-cpu")
    prompts = [[(7 * i + 13 * j) % 31000 + 100 for j in range(64)] for i in range(args.prompts)]
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, (tp, pp) in MODES.items():
            rates[mode].append(run_mode(model, tp, pp, prompts, args.tokens))
            print(f"{mode}: {rates[mode][-1]:.1f} output tok/s", flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "workload": f"{args.prompts} prompts x 64 tokens in, {args.tokens} out, greedy, fp32",
        "median_output_tok_s": {mode: statistics.median(r) for mode, r in rates.items()},
        "rounds": rates,
    }
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
