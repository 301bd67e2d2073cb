"""AMD GPUs through a ROCm (HIP) build of torch, which exposes them as ``cuda`` devices.

torch's HIP build answers the same ``torch.cuda`` calls as CUDA's (memory, streams,
graphs: ``torch.cuda.CUDAGraph`` records a HIP graph), RCCL stands behind the ``nccl``
backend name of ``torch.distributed``, and Triton compiles the attention backend
(``tessellm-attention-triton``) and the fused kernels (``tessellm-triton-kernels``) for
AMD GPUs. So this platform is the CUDA platform's code (``tessellm-cuda``: KV cache
budget, graph runner, the fused-kernel table) with AMD's own detection and the decisions
that differ by architecture (``arch.py``): the run dtype, the launch width of the fused
GEMV kernels on 64-wide wavefronts, and how an fp8 KV cache is kept. Not run on AMD
hardware: see docs/rocm.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from tessellm.interfaces.ops import FusedOps
from tessellm_cuda.detect import Probe
from tessellm_cuda.platform import CudaPlatform

from .arch import KvCacheFp8, RocmArch, kv_cache_fp8, lookup
from .detect import probe_rocm

# The threads per program NVIDIA's tuning of the fused kernels launched with: num_warps
# 32-thread warps. Triton's num_warps counts wavefronts on AMD.
TUNED_WARP_SIZE = 32


def wave_scaled_warps(num_warps: int, wavefront_size: int) -> int:
    """The ``num_warps`` that gives a program as many threads on ``wavefront_size``-wide
    wavefronts as ``num_warps`` gave on 32-thread warps (at least one wavefront)."""
    return max(1, num_warps * TUNED_WARP_SIZE // wavefront_size)


class RocmPlatform(CudaPlatform):
    name = "rocm"
    device_type = "cuda"  # what torch's HIP build calls its devices
    priority = 10
    distributed_backend = "nccl"  # RCCL, under the name torch gives it
    attention_backends: ClassVar[tuple[str, ...]] = ("triton", "torch")

    @classmethod
    def probe(cls) -> Probe:
        return probe_rocm()

    def arch(self) -> RocmArch:
        """The facts of this process's device (``device()`` chose it)."""
        props = torch.cuda.get_device_properties(self._device_index)
        return lookup(props.gcnArchName)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.arch().bf16 else torch.float16

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.arch().bf16:
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)

    def kv_cache_fp8(self, kv_cache_dtype: str) -> KvCacheFp8 | None:
        """How an fp8 KV cache is kept on this device (None: ``"auto"``)."""
        return kv_cache_fp8(self.arch(), kv_cache_dtype)

    def fused_ops(self, dtype: torch.dtype) -> FusedOps | None:
        """The CUDA platform's table; on 64-wide wavefronts the GEMV-fused entries launch
        with half the ``num_warps``, keeping the threads per program (and so the registers
        each thread holds of the input row) that they were tuned with on NVIDIA."""
        table = super().fused_ops(dtype)
        wavefront = self.arch().wavefront_size
        if table is None or wavefront == TUNED_WARP_SIZE:
            return table
        from tessellm_triton_kernels.linear_ops import LinearFusions
        from tessellm_triton_kernels.norm_gemv import DEFAULT_CONFIG, DEFAULT_SILU_CONFIG
        from tessellm_triton_kernels.ops import LINEAR_OPS

        def scaled(config):
            warps = wave_scaled_warps(config.num_warps, wavefront)
            return dataclasses.replace(config, num_warps=warps)

        fusions = LinearFusions(scaled(DEFAULT_CONFIG), scaled(DEFAULT_SILU_CONFIG))
        linear = {
            name: getattr(fusions, name) for name in LINEAR_OPS if getattr(table, name) is not None
        }
        return dataclasses.replace(table, **linear)
