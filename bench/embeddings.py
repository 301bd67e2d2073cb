"""Embedding throughput: tessellm's pooling engine against sentence-transformers' ``encode``.

The same sentences (``--num`` of them, ``--min-words``..``--max-words`` common English
words each, seeded), the same model (all-MiniLM-L6-v2 from the ``all-minilm-l6-v2`` model
source by default), batches of ``--batch`` on both sides (tessellm: ``max_num_seqs``;
sentence-transformers: ``batch_size``), fp32, the same torch thread count. Both sides
tokenize and return every vector. Rounds alternate which side runs first; the medians
are reported (and the median of each round's ratio), so a slow moment of a shared
machine does not land on one side only. The vectors of the two sides are compared too
(lowest cosine similarity).

    python bench/embeddings.py --rounds 7 --json bench/results/embeddings.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

_TEXT = (
    "the of and to in is was for that on with as by at from his her they which this be are "
    "it an had not were but have their one all there been has who more would when will "
    "also other after first into time two new years city school world people music state "
    "team game film book water light house river village family church war life season "
    "small large early later during north south west east government history album band "
    "played released population located known called named built during between under "
    "several against second three four many most some each before since while where "
    "about around over through until along among within without across every market "
    "company system village island station road bridge mountain lake forest field garden"
)
WORDS = _TEXT.split()


def sentences(num: int, min_words: int, max_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--num", type=int, default=1024)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from tessellm import LLM

    texts = sentences(args.num, args.min_words, args.max_words, args.seed)
    llm = LLM(model=args.model, dtype="float32", device="cpu", max_num_seqs=args.batch)
    path = str(llm.engine.resolved.path)
    st = SentenceTransformer(path, device="cpu")
    tokens = sum(len(llm.engine.tokenize(t)) for t in texts)

    def ours() -> torch.Tensor:
        return torch.tensor([o.outputs.embedding for o in llm.embed(texts)])

    def reference() -> torch.Tensor:
        return st.encode(texts, batch_size=args.batch, convert_to_tensor=True)

    ours(), reference()  # warm-up: first-call allocations and kernel choices
    times: dict[str, list[float]] = {"tessellm": [], "sentence-transformers": []}
    lowest_cosine = 1.0
    for r in range(args.rounds):
        order = [("tessellm", ours), ("sentence-transformers", reference)]
        outputs = {}
        for name, fn in order if r % 2 == 0 else order[::-1]:
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
        cosine = F.cosine_similarity(outputs["tessellm"], outputs["sentence-transformers"])
        lowest_cosine = min(lowest_cosine, float(cosine.min()))

    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model,
        "sentences": args.num,
        "tokens": tokens,
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds": times,
        "median_seconds": median,
        "sentences_per_s": {name: args.num / s for name, s in median.items()},
        "tokens_per_s": {name: tokens / s for name, s in median.items()},
        "speedup": median["sentence-transformers"] / median["tessellm"],
        # Each round's own ratio (both sides ran back to back), then their median: less
        # exposed to a slow stretch of the shared machine than the ratio of medians.
        "speedup_paired_median": statistics.median(
            b / a for a, b in zip(times["tessellm"], times["sentence-transformers"], strict=True)
        ),
        "lowest_cosine": lowest_cosine,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(
        f"{args.num} sentences ({tokens} tokens), batch {args.batch}, {args.threads} threads, "
        f"{args.rounds} rounds (medians):"
    )
    for name in times:
        print(
            f"  {name:22s} {median[name]:.3f} s  {result['sentences_per_s'][name]:8.1f} "
            f"sentences/s  {result['tokens_per_s'][name]:9.0f} tokens/s"
        )
    print(
        f"  speed-up {result['speedup']:.2f}x (medians), {result['speedup_paired_median']:.2f}x "
        f"(median of each round's ratio); lowest cosine similarity {lowest_cosine:.6f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
