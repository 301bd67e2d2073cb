"""Per-call time of the compiled decode library (1 token), the compiled verification
library (Q = 5 tokens, one sequence) and the eager forward of the same steps, default
model, one sequence at a context of CTX tokens; interleaved rounds, medians."""

import os
import statistics
import sys
import time

os.environ.setdefault("TESSELLM_CPU_COMPILE", "wait")
import torch

from tessellm import LLM
from tessellm.interfaces.attention import AttentionMetadata

CTX = int(sys.argv[1]) if len(sys.argv) > 1 else 300
llm = LLM(
    model="smollm2-135m-instruct",
    max_num_seqs=1,
    speculative_config={"method": "ngram", "num_speculative_tokens": 4},
)
mr = llm.engine.executor.runner
r = mr.graph_runner
dec = r._libraries[0][2]
ver = r.verify.libraries[0][2]
bs = r.verify.block_size


def meta(q):
    n = CTX + q
    width = (CTX + 5 + bs - 1) // bs  # room for the padding to Q = 5
    table = torch.arange(1, width + 1, dtype=torch.int32)[None]
    pos = torch.arange(CTX, n, dtype=torch.int64)
    slots = table[0, pos // bs].long() * bs + pos % bs
    loc = torch.tensor([0, q], dtype=torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    m = AttentionMetadata(
        query_start_loc=loc,
        seq_lens=lens,
        block_tables=table,
        slot_mapping=slots,
        max_query_len=q,
        max_seq_len=n,
        query_start_loc_cpu=loc,
        seq_lens_cpu=lens,
    )
    return torch.full((q,), 5, dtype=torch.int64), pos, m


def lib_call(lib, q):
    ids, pos, m = meta(q)
    inputs = [ids, pos, m.slot_mapping, m.block_tables, m.seq_lens, *r._static]
    return lambda: lib.boxed_run(list(inputs))


def eager_call(q):
    ids, pos, m = meta(q)

    def f():
        mr.attention.prepare(m)
        return mr.model(ids, pos, m)

    return f


def runner_call(q):  # through the runner: padding included (q < 5)
    ids, pos, m = meta(q)
    return lambda: r(ids, pos, m)


cases = {
    "compiled decode (1 token)": lib_call(dec, 1),
    "compiled verify (Q=5)": lib_call(ver, 5),
    "runner: 3 tokens padded to 5": runner_call(3),
    "eager decode (1 token)": eager_call(1),
    "eager verify (5 tokens)": eager_call(5),
    "eager verify (3 tokens)": eager_call(3),
}
res = {k: [] for k in cases}
with torch.inference_mode():
    for f in cases.values():
        for _ in range(3):
            f()
    for _rnd in range(7):
        for k, f in cases.items():
            t = time.perf_counter()
            for _ in range(10):
                f()
            res[k].append((time.perf_counter() - t) / 10 * 1e3)
print(f"context {CTX}, threads {torch.get_num_threads()}, dtype {mr.dtype}")
for k, v in res.items():
    print(f"{k:38s} median {statistics.median(v):7.2f} ms  range {min(v):.2f}-{max(v):.2f}")
