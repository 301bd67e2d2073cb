"""KV memory per request and concurrent requests at a long context, windowed layers in
their own KV groups (the hybrid layout) against one shared table (``disable_hybrid_kv_
cache_manager=True``, what every model had before), on Gemma 3 270M.

Each layout builds the real engine (the real model, its real KV page size) with the same
KV budget (``kv_cache_memory_bytes``), then fills its KV cache manager with requests of
``--context`` tokens (every prompt computed and one token decoded, so windowed groups
have freed what lies outside their window) until no more fits: the max concurrent
requests (prompts allocated in chunks of the default token budget, as chunked prefill
does: a windowed group needs a whole chunk's blocks while the chunk runs). Memory per
request = pages it holds x the page size. Then one request of a prompt longer than the
window is generated for real on each layout, and the tokens must be equal.

    python bench/cachespec_window_kv.py [--model gemma3-270m] [--context 32768]
"""

from __future__ import annotations

import argparse
import json
import time

from tessellm import LLM, SamplingParams
from tessellm.interfaces.request import Request

MIB = 1 << 20


def fill(llm: LLM, context: int, chunk: int) -> dict:
    engine = llm.engine
    kv = engine.kv_cache_manager
    runner = engine.executor.runner
    page = runner.bytes_per_block()
    held = []
    while True:
        # The prompt in chunks of the scheduler's token budget, then the first decode: a
        # windowed group drops what it no longer reads at each allocation.
        req = Request(f"r{len(held)}", [7] * context, SamplingParams(max_tokens=1))
        steps = [min(chunk, context - 1 - done) for done in range(0, context - 1, chunk)] + [1]
        fits = True
        for n in steps:
            if not kv.can_allocate(req, n):
                fits = False
                break
            kv.allocate(req, n)
            if req.num_computed_tokens + n < context:  # the decode's token stays unwritten
                req.num_computed_tokens += n
        if not fits:
            kv.free(req)
            break
        held.append(req)
    pages = [
        sum(
            b != getattr(kv, "null_block", -1) for t in (r.block_ids, *r.group_block_ids) for b in t
        )
        for r in held
    ]
    for r in held:
        kv.free(r)
    layout = runner.cache_layout
    return {
        "groups": [[len(g.layers), g.window] for g in layout.groups],
        "page_bytes": page,
        "num_pages": engine.num_blocks,
        "pages_per_request": pages[0] if pages else None,
        "kv_mib_per_request": pages[0] * page / MIB if pages else None,
        "max_concurrent_requests": len(held),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--kv-mib", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=8192)  # the default token budget
    parser.add_argument("--check-tokens", type=int, default=8)
    parser.add_argument("--check-prompt", type=int, default=700)
    args = parser.parse_args()
    results = {}
    for name, disable in (("shared_table", True), ("hybrid", False)):
        started = time.monotonic()
        llm = LLM(
            model=args.model,
            max_model_len=args.context,
            max_num_seqs=256,
            kv_cache_memory_bytes=args.kv_mib * MIB,
            enforce_eager=True,
            disable_hybrid_kv_cache_manager=disable,
        )
        result = fill(llm, args.context, args.chunk)
        prompt = [(i * 37) % 5000 + 100 for i in range(args.check_prompt)]
        params = SamplingParams(temperature=0.0, max_tokens=args.check_tokens, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
        result["check_tokens"] = list(out.outputs[0].token_ids)
        result["seconds"] = round(time.monotonic() - started, 1)
        llm.engine.shutdown()
        results[name] = result
        print(name, json.dumps(result))
    same = results["hybrid"]["check_tokens"] == results["shared_table"]["check_tokens"]
    print(json.dumps({"model": args.model, "context": args.context, "kv_mib": args.kv_mib}))
    print("greedy tokens equal across layouts:", same)


if __name__ == "__main__":
    main()
