"""The CPU: always available; bf16 where the CPU computes it natively, threads per core."""

from __future__ import annotations

import os
from functools import cache

import torch
from torch import nn

from tessellm.config import default_cache_dir
from tessellm.interfaces.attention import AttentionBackend
from tessellm.interfaces.ops import FusedOps
from tessellm.interfaces.platform import GraphRunner, GraphSpec, Platform
from tessellm_cpu.thread_binding import one_cpu_per_core

# Most a CPU KV cache takes by default, whatever the machine's memory: beyond this a
# laptop would start swapping before the cache fills. TESSELLM_CPU_KVCACHE_SPACE (GiB, as
# vLLM's VLLM_CPU_KVCACHE_SPACE) replaces the cap; kv_cache_memory_bytes overrides both.
DEFAULT_CPU_KV_CAP = 4 << 30
KV_SPACE_ENV = "TESSELLM_CPU_KVCACHE_SPACE"


def kv_cache_cap_bytes() -> int:
    raw = os.environ.get(KV_SPACE_ENV, "").strip()
    if not raw:
        return DEFAULT_CPU_KV_CAP
    try:
        gib = float(raw)
    except ValueError:
        from tessellm.errors import ConfigError

        raise ConfigError(f"{KV_SPACE_ENV} must be a number of GiB, got {raw!r}") from None
    return int(gib * (1 << 30))


@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def physical_cores() -> int:
    """The physical cores this process may run on: hyper-threads share a core's vector
    units. Counted among the allowed CPUs, as the thread binding picks them (two
    hyper-threads of one core allowed are one core, however many the machine has)."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    return max(1, len(one_cpu_per_core(os.sched_getaffinity(0))))


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 0
    distributed_backend = "gloo"
    attention_backends = ("cpu", "torch")
    # Compiled decode steps take one block table per KV group (decode_groups.py).
    graph_runner_serves_kv_groups = True
    # A few cores are compute-bound from a handful of rows on: a decode token costs as much
    # in a prefill step as in its own, so prompts run alone and first (at 4 req/s on 2
    # cores: TTFT p99 900 -> ~500 ms, TPOT p50 ~4 % longer; bench/RESULTS.md).
    mixed_batches = False
    # TESSELLM_CPU_OMP_THREADS_BIND as set_up_process read it (thread_binding.py).
    thread_binding: str | list[int] = "auto"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def available_reason(cls) -> str:
        flags = cpu_flags()
        isa = torch.backends.cpu.get_cpu_capability()
        bf16 = "native bf16" if {"avx512_bf16", "amx_bf16"} & flags else "no native bf16"
        return f"always available: {os.cpu_count()} logical CPUs, {isa}, {bf16}"

    def default_dtype(self) -> torch.dtype:
        flags = cpu_flags()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return torch.bfloat16
        return torch.float32

    def set_up_process(self) -> None:
        from tessellm_cpu.thread_binding import read_setting

        self.thread_binding = read_setting()
        if not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(physical_cores())

    def bind_step_thread(self) -> None:
        from tessellm_cpu.thread_binding import bind_step_thread

        bind_step_thread(self.thread_binding)

    def default_quantization(self, dtype: torch.dtype) -> str | None:
        # Weights already on a 4-bit grid (GGUF Q4_1) keep their 4 bits in memory: batch-1
        # decode reads a quarter of the bytes. fp32 runs stay dense: they are the exact
        # reference, and the int4 kernel sums in another order.
        return "woq_grid" if dtype in (torch.bfloat16, torch.float16) else None

    def fused_ops(self, dtype: torch.dtype) -> FusedOps | None:
        from tessellm_cpu.ops import cpu_fused_ops

        return cpu_fused_ops(dtype)

    def graph_runner(
        self, model: nn.Module, attention: AttentionBackend, spec: GraphSpec
    ) -> GraphRunner | None:
        # Decode steps compiled ahead of time (compiled_decode.py), where the attention
        # backend can be traced.
        if not attention.graph_capturable:
            return None
        from tessellm_cpu.compiled_decode import CompiledDecodeRunner

        return CompiledDecodeRunner(model, spec, default_cache_dir())

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        free = mem_available_bytes() * utilization - model_bytes
        return int(max(0, min(free, kv_cache_cap_bytes())))
