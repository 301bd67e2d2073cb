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
wall time (its prefill included; after the warm-up the prompt is a prefix-cache hit for
the target and for the draft alike); "1st ms" is the proposer's first call of a request,
"prop ms" the median of the rest (one round of k drafts); compiled
steps count the target's and the draft's steps run by the CPU's compiled libraries
(``multi``: several tokens a sequence). Each mode's tokens are compared with its target's
run without drafts.

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


class Probe:
    """Per-engine instruments: the proposer's time per call, and how many steps of the
    target's and the draft's runners ran compiled (the CPU's graph runner)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.propose_seconds: list[float] = []
        speculator = llm.engine.speculator
        self.runners = {"target": llm.engine.executor.runner}
        if speculator is not None:
            proposer = speculator.proposer
            plain = proposer.propose

            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return plain(*args, **kwargs)
                finally:
                    self.propose_seconds.append(time.perf_counter() - start)

            proposer.propose = timed
            draft = getattr(proposer, "draft", None)
            if draft is not None:
                self.runners["draft"] = draft.runner

    def counters(self) -> dict[str, float]:
        stats = self.llm.engine.stats()
        keys = (
            "steps",
            "spec_decode_num_drafts",
            "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens",
        )
        found = {key: float(stats.get(key, 0.0)) for key in keys}
        for name, runner in self.runners.items():
            graphs = runner.graph_runner
            found[f"{name}_compiled"] = float(getattr(graphs, "steps", 0))
            verify = getattr(graphs, "verify_steps", 0)  # a property, or a method
            found[f"{name}_compiled_multi"] = float(verify() if callable(verify) else verify)
        return found


def run_once(probe: Probe, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = probe.counters()
    calls = len(probe.propose_seconds)
    start = time.perf_counter()
    (output,) = probe.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = probe.counters()
    delta = {key: after[key] - before[key] for key in after}
    proposes = probe.propose_seconds[calls:]
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
        # The first call catches the draft up on the whole prompt; the rest are rounds.
        "first_propose_ms": 1000 * proposes[0] if proposes else None,
        "propose_ms": 1000 * statistics.median(proposes[1:]) if len(proposes) > 1 else None,
        "compiled": {k: v for k, v in delta.items() if k.endswith(("compiled", "multi"))},
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
    engines: dict[str, Probe] = {}
    for name, (quantization, spec) in chosen.items():
        start = time.perf_counter()
        llm = LLM(
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
        engines[name] = Probe(llm)
        print(f"built {name} in {time.perf_counter() - start:.1f} s: {what}", flush=True)
    tokenizer = engines["off"].llm.get_tokenizer()
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
    for name, probe in engines.items():  # warm-up; the draft reads the prompt cold
        warm = run_once(probe, prompt_ids, 16)
        if warm["first_propose_ms"] is not None:
            print(
                f"{name}: the draft's first call, whole prompt: {warm['first_propose_ms']:.0f} ms"
            )

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
        f"\n{'mode':16} {'tok/s':>7} {'range':>13} {'x off':>6} {'accept':>7} {'len':>5} "
        f"{'1st ms':>7} {'prop ms':>8} {'steps':>6} same  compiled steps (last run)"
    )

    def cell(value: float | None, width: int, digits: int = 1) -> str:
        return f"{'' if value is None else f'{value:.{digits}f}':>{width}}"

    for name, runs in results.items():
        speeds = [r["tok_s"] for r in runs]
        median = statistics.median(speeds)
        last = runs[-1]
        # A dense target's greedy text is compared with the dense run without drafts.
        expected = dense if name.startswith("dense") and dense is not None else reference
        same = all(r["tokens"] == expected for r in runs)
        firsts = [r["first_propose_ms"] for r in runs if r["first_propose_ms"] is not None]
        rounds = [r["propose_ms"] for r in runs if r["propose_ms"] is not None]
        compiled = " ".join(f"{k}={v:.0f}" for k, v in last["compiled"].items())
        print(
            f"{name:16} {median:7.1f} {min(speeds):6.1f}-{max(speeds):<6.1f} "
            f"{median / base:6.2f} {cell(last['acceptance'], 7, 2)} "
            f"{cell(last['mean_accepted_length'], 5, 2)} "
            f"{cell(statistics.median(firsts) if firsts else None, 7)} "
            f"{cell(statistics.median(rounds) if rounds else None, 8)} "
            f"{last['target_steps']:6.0f} {same!s:5} {compiled}"
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
    for probe in engines.values():
        probe.llm.engine.shutdown()


if __name__ == "__main__":
    main()
