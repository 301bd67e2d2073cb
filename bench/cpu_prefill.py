"""In-process prefill time of the default model: ``LLM.generate`` of a fresh random prompt
with ``max_tokens=1`` (no prefix-cache hit), the median of ``--runs``. ``--plain-gemm``
loads the model without the GGUF dense copies' oneDNN blocked layout (the A/B of
``tessellm_gguf.runtime.add_onednn_copies``). Run with the machine otherwise idle:

    TESSELLM_CPU_COMPILE=0 python bench/cpu_prefill.py --runs 8 --prompt-len 30
    TESSELLM_CPU_COMPILE=0 python bench/cpu_prefill.py --runs 8 --prompt-len 30 --plain-gemm
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=30)
    parser.add_argument("--plain-gemm", action="store_true")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    if args.plain_gemm:
        import tessellm_gguf.method

        tessellm_gguf.method.add_onednn_copies = lambda model, budget: 0
    from tessellm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    rng = random.Random(0)

    def prefill_ms() -> float:
        prompt = [rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return (time.perf_counter() - start) * 1000

    for _ in range(3):
        prefill_ms()
    times = [prefill_ms() for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "model": args.model,
                "prompt_len": args.prompt_len,
                "plain_gemm": args.plain_gemm,
                "dtype": args.dtype,
                "median_ms": round(statistics.median(times), 1),
                "runs_ms": [round(t, 1) for t in times],
            }
        )
    )


if __name__ == "__main__":
    main()
