"""Issue 17's CPU measurement: batch-1 greedy decode of the default model on an
edit-the-text workload (the output copies most of the prompt), with and without
speculative decoding, in interleaved rounds on one machine.

    python bench/speculative_cpu.py --rounds 3 --json out.json \
        --config none --config '{"method": "ngram", "num_speculative_tokens": 4}'

Each config is a separate engine built once; every round runs each engine over the same
requests one at a time (batch 1) and records tokens per second of the whole request
(prompt included, as a user waits for it) and of decode alone (after the first token).
Greedy outputs must be identical across configs; the script checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

PARAGRAPHS = [
    "The city council met on Tuesday to discuss the new park. Residents asked for more "
    "trees, a playground and better lighting along the river path. The mayor promised a "
    "decision before the end of the month, after a second public meeting.",
    "Our quarterly report shows revenue of 4.2 million dollars, up 12 percent from last "
    "year. Costs rose by 5 percent, mostly from hiring in the support team. We expect the "
    "new pricing plan to lift margins in the second half of the year.",
    "To install the tool, download the archive, unpack it into your home folder and add "
    "the bin directory to your PATH. Then run the setup command once; it creates a "
    "configuration file that you can edit later with any text editor.",
    "The museum opens at nine in the morning and closes at six in the evening, except on "
    "Mondays. Tickets cost twelve euros for adults and six for students. Guided tours in "
    "English start every hour from the main hall.",
]
EDITS = [("Tuesday", "Friday"), ("12 percent", "15 percent"), ("home folder", "desktop"),
         ("twelve euros", "ten euros")]  # fmt: skip


def requests() -> list[list[dict[str, str]]]:
    return [
        [
            {
                "role": "user",
                "content": f"Rewrite this text exactly, only changing '{old}' to '{new}':"
                f"\n\n{text}",
            }
        ]
        for text, (old, new) in zip(PARAGRAPHS, EDITS, strict=True)
    ]


def build(model: str, config: str | None, dtype: str):
    from tessellm import LLM

    spec = None if config in (None, "none") else json.loads(config)
    return LLM(model=model, dtype=dtype, max_num_seqs=1, speculative_config=spec)


def run_once(llm, chat: list[dict[str, str]], max_tokens: int) -> tuple[float, float, list[int]]:
    from tessellm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    out = llm.chat(chat, params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    tokens = list(out.outputs[0].token_ids)
    ttft = out.metrics.get("time_to_first_token", 0.0)
    decode_s = max(elapsed - ttft, 1e-9)
    return len(tokens) / elapsed, (len(tokens) - 1) / decode_s, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--config", action="append", required=True, help="'none' or JSON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    engines = {config: build(args.model, config, args.dtype) for config in args.config}
    chats = requests()
    for llm in engines.values():  # warm-up: first-call allocations, compiled steps loaded
        run_once(llm, chats[0], 8)
    samples: dict[str, dict[str, list[float]]] = {c: {"e2e": [], "decode": []} for c in engines}
    outputs: dict[str, list[list[int]]] = {c: [] for c in engines}
    for round_index in range(args.rounds):
        for config, llm in engines.items():
            for i, chat in enumerate(chats):
                e2e, decode, tokens = run_once(llm, chat, args.max_tokens)
                samples[config]["e2e"].append(e2e)
                samples[config]["decode"].append(decode)
                if round_index == 0:
                    outputs[config].append(tokens)
                print(f"round {round_index} {config[:40]:40s} req {i}: {e2e:6.1f} tok/s e2e")
    reference = outputs[args.config[0]]
    same = {c: outputs[c] == reference for c in engines}
    base = statistics.median(samples[args.config[0]]["e2e"])
    report = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "results": [],
    }
    for config, llm in engines.items():
        stats = llm.engine.stats()
        e2e = statistics.median(samples[config]["e2e"])
        row = {
            "config": config,
            "e2e_tok_s_median": round(e2e, 2),
            "decode_tok_s_median": round(statistics.median(samples[config]["decode"]), 2),
            "speedup_vs_first": round(e2e / base, 3),
            "same_greedy_tokens_as_first": same[config],
            "acceptance_rate": round(stats.get("spec_decode_acceptance_rate", 0.0), 3),
            "mean_accepted_length": round(stats.get("spec_decode_mean_accepted_length", 0.0), 3),
            "proposer_ms_per_step": round(stats.get("spec_decode_proposer_ms_per_step", 0.0), 3),
            "engine": llm.engine.describe(),
        }
        report["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "engine"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
