"""Speculative decoding with a draft model on the CPU, batch 1, greedy: tok/s of the
default model (SmolLM2-135M-Instruct, a Q4_1 GGUF) with and without drafts.

Modes (``--modes``; ``modes()`` lists them): ``off``, the CPU default (the GGUF's int4
kernels, bf16); ``draft_self``, the same model drafting for itself (every draft accepted:
the cost of verifying, the ceiling of the method); ``dense_off``, the same weights
dequantized (``quantization="none"``); ``dense_draft_int4``, that dense target with the
int4 GGUF as its draft (a quantized copy of the target); requantized drafts
(``draft_woq_int4``, ``draft_int8``) and ``ngram`` on request.

One engine per mode, all built first (compiled decode and verification steps built
before measuring: ``TESSELLM_CPU_COMPILE=wait``), ``max_num_seqs=1``. The prompt asks the
chat model to repeat a paragraph longer than the output, so all ``--max-tokens`` outputs
are the repeat (``ignore_eos`` keeps the count fixed). Every round runs each mode once,
in a shuffled order, so load from other processes falls on every mode; a mode's figure
is the median over rounds, with the range. tok/s is output tokens over the request's
wall time (its prefill included). Each mode's tokens are compared with its target's run
without drafts.

    python bench/spec_draft_cpu.py --rounds 5 --k 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from typing import Any

os.environ.setdefault("TESSELLM_CPU_COMPILE", "wait")

from tessellm import LLM, SamplingParams

MODEL = "smollm2-135m-instruct"
PARAGRAPH = (
    "The lighthouse stood at the end of a narrow spit of land, where the sea met the "
    "river in a long line of foam. Every evening the keeper climbed the one hundred and "
    "twelve steps to the lamp room, trimmed the wick, polished the great lens and wrote "
    "the state of the weather in a leather book that had belonged to his grandfather. "
    "Ships that passed in the night saw the beam sweep across the water once every ten "
    "seconds, and their captains knew exactly where they were. In the winter storms the "
    "waves broke over the rocks below and spray rattled against the windows, but the "
    "light never failed. When the keeper finally retired, the lamp was replaced by an "
    "automatic one, and the leather books were given to the town museum, where children "
    "still read about the fog of 1923 and the night the fishing fleet came home safely."
)
PROMPT = f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}"


def modes(k: int) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
    """Mode name -> (the target's ``quantization``, its ``speculative_config``)."""
    draft = {"method": "draft_model", "model": MODEL, "num_speculative_tokens": k}
    return {
        # The CPU default: the Q4_1 GGUF run by its int4 kernels.
        "off": (None, None),
        "draft_self": (None, draft),
        # The same weights dequantized (dense), drafted for by the int4 GGUF.
        "dense_off": ("none", None),
        "dense_draft_int4": ("none", draft),
        # Requantized copies of the GGUF as drafts (not cheaper than the int4 target).
        "draft_woq_int4": (None, {**draft, "quantization": "woq_int4"}),
        "draft_int8": (None, {**draft, "quantization": "int8_weight_only"}),
        "ngram": (None, {"method": "ngram", "num_speculative_tokens": k}),
    }


DEFAULT_MODES = ("off", "draft_self", "dense_off", "dense_draft_int4")


def spec_counters(llm: LLM) -> dict[str, float]:
    stats = llm.engine.stats()
    keys = (
        "steps",
        "spec_decode_num_drafts",
        "spec_decode_num_draft_tokens",
        "spec_decode_num_accepted_tokens",
        "spec_decode_proposer_seconds",
    )
    return {key: float(stats.get(key, 0.0)) for key in keys}


def run_once(llm: LLM, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = spec_counters(llm)
    start = time.perf_counter()
    (output,) = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = spec_counters(llm)
    delta = {key: after[key] - before[key] for key in after}
    tokens = list(output.outputs[0].token_ids)
    drafted = delta["spec_decode_num_draft_tokens"]
    rounds = delta["spec_decode_num_drafts"]
    return {
        "tokens": tokens,
        "tok_s": len(tokens) / seconds,
        "target_steps": delta["steps"],
        "acceptance": delta["spec_decode_num_accepted_tokens"] / drafted if drafted else None,
        "mean_accepted_length": (
            1 + delta["spec_decode_num_accepted_tokens"] / rounds if rounds else None
        ),
        "proposer_ms_per_round": (
            1000 * delta["spec_decode_proposer_seconds"] / rounds if rounds else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--modes", nargs="+", default=list(DEFAULT_MODES), help="of: " + ", ".join(modes(3))
    )
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()

    known = modes(args.k)
    chosen = {name: known[name] for name in dict.fromkeys(["off", *args.modes])}
    engines: dict[str, LLM] = {}
    for name, (quantization, spec) in chosen.items():
        start = time.perf_counter()
        engines[name] = llm = LLM(
            model=MODEL,
            max_num_seqs=1,
            max_model_len=1024,
            quantization=quantization,
            speculative_config=spec,
        )
        runner = llm.engine.executor.runner
        what = f"{runner.dtype} {runner.quantization}"
        if llm.engine.speculator is not None:
            what += f", {llm.engine.speculator.proposer.describe()}"
        print(f"built {name} in {time.perf_counter() - start:.1f} s: {what}", flush=True)
    tokenizer = engines["off"].get_tokenizer()
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(prompt_ids, list):  # a BatchEncoding in some transformers versions
        prompt_ids = list(prompt_ids["input_ids"])
    print(
        f"model {MODEL}, {os.environ.get('OMP_NUM_THREADS') or 'default'} threads; prompt "
        f"{len(prompt_ids)} tokens, {args.max_tokens} outputs, k={args.k}",
        flush=True,
    )
    for llm in engines.values():  # warm-up
        run_once(llm, prompt_ids, 16)

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    names = list(engines)
    for index in range(args.rounds):
        random.shuffle(names)
        for name in names:
            results[name].append(run_once(engines[name], prompt_ids, args.max_tokens))
        line = ", ".join(f"{n} {results[n][-1]['tok_s']:.1f}" for n in engines)
        print(f"round {index + 1}: tok/s {line}", flush=True)

    reference = results["off"][0]["tokens"]
    dense = results.get("dense_off", [{}])[0].get("tokens")
    base = statistics.median(r["tok_s"] for r in results["off"])
    print(
        f"\n{'mode':16} {'tok/s':>7} {'range':>13} {'x off':>6} {'accept':>7} "
        f"{'len':>5} {'prop ms':>8} {'steps':>6} same"
    )
    for name, runs in results.items():
        speeds = [r["tok_s"] for r in runs]
        median = statistics.median(speeds)
        last = runs[-1]
        accept = last["acceptance"]
        length = last["mean_accepted_length"]
        proposer = last["proposer_ms_per_round"]
        # A dense target's greedy text is compared with the dense run without drafts.
        expected = dense if name.startswith("dense") and dense is not None else reference
        same = all(r["tokens"] == expected for r in runs)
        print(
            f"{name:16} {median:7.1f} {min(speeds):6.1f}-{max(speeds):<6.1f} "
            f"{median / base:6.2f} {'' if accept is None else f'{accept:.2f}':>7} "
            f"{'' if length is None else f'{length:.2f}':>5} "
            f"{'' if proposer is None else f'{proposer:.1f}':>8} "
            f"{last['target_steps']:6.0f} {same}"
        )
    print(f"\ntext (off): {tokenizer.decode(reference)[:300]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "k": args.k,
                    "prompt_tokens": len(prompt_ids),
                    "results": {
                        n: [{k: v for k, v in r.items() if k != "tokens"} for r in runs]
                        for n, runs in results.items()
                    },
                },
                f,
                indent=1,
            )
    for llm in engines.values():
        llm.engine.shutdown()


if __name__ == "__main__":
    main()
