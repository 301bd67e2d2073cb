"""Throwaway prototype: the eager CPU backend's bf16 block-diagonal decode computed in fp32.

python proto_eager_bf16_in_fp32.py {base,fp32inside} {16,64}   (OMP_NUM_THREADS=1)
"""

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
import ipex_paged_attention as bench

from tessellm_attention_cpu.backend import CpuPagedAttention

original = CpuPagedAttention._decode_block_diagonal


def block_diagonal_in_fp32(self, q, k, v, group, scale, window, cap):
    out = original(self, q.float(), k.float(), v.float(), group, scale, window, cap)
    return out.to(q.dtype)


mode, batch = sys.argv[1], int(sys.argv[2])
if mode == "fp32inside":
    CpuPagedAttention._decode_block_diagonal = block_diagonal_in_fp32
torch.set_num_threads(1)
inputs = bench.make_inputs(torch, batch, "bf16")
scale = bench.HEAD_SIZE**-0.5
call, _ = bench.tessellm_call(torch, inputs, scale)
with torch.inference_mode():
    err = (call().float() - bench.reference(torch, inputs, scale)).abs().max().item()
    times = bench.time_calls(call, 0.5, 30, 2000)
print(
    json.dumps(
        {"mode": mode, "batch": batch, "median_ms": statistics.median(times) / 1e3, "err": err}
    )
)
