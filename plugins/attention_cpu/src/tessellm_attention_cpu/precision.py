"""Which dtype the CPU backend computes attention in, for a cache of a given dtype.

bf16 and fp16 halve the bytes a cache holds and a gather copies, but on a CPU without
instructions for them every matmul on them is emulated: oneDNN and ATen convert each
tile to fp32 and back, which costs far more than the arithmetic. There, the backend
converts the blocks a step gathers (never the whole cache) to fp32 once, attends in
fp32 and casts the output back (backend.py).
"""

from __future__ import annotations

from functools import cache

import torch

# /proc/cpuinfo flags (x86 "flags", aarch64 "Features") that give a dtype native dot
# products: x86 AVX512-BF16 / AMX-BF16 and AVX512-FP16 / AMX-FP16; Arm FEAT_BF16
# (BFDOT/BFMMLA) and the half-precision vector arithmetic of Armv8.2.
NATIVE_FLAGS: dict[torch.dtype, frozenset[str]] = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512fp16", "amx_fp16", "asimdhp"}),
}


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo; empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def attention_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the eager CPU backend computes in for a KV cache and query of ``dtype``:
    ``dtype`` itself when the CPU has native instructions for it (or it is fp32), else
    fp32.

    Why: on a CPU without native bf16 (AVX2, or AVX-512 without AVX512-BF16) the batched
    bf16 decode attention of a layer took 80 ms at 64 sequences of 512 tokens against
    21 ms for the same math in fp32, gather and conversion included (2-core AMD EPYC,
    AVX2; bench/cpu_attention_dtype.py measures it). With native support the bf16
    matmuls run on bf16 units and read half the bytes, so the dtype is kept. Where the
    flags cannot be read (no /proc/cpuinfo) nothing is known to be native: fp32, which
    is never wrong, at worst slower."""
    native = NATIVE_FLAGS.get(dtype)
    if native is None or native & cpu_flags():
        return dtype
    return torch.float32
