"""NVIDIA GPUs: bf16 on Ampere and newer, KV cache from free memory, CUDA graphs, NCCL."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionBackend
from tessellm.interfaces.ops import FusedOps
from tessellm.interfaces.platform import GraphRunner, GraphSpec, Platform

from .detect import Probe, probe_cuda

logger = logging.getLogger(__name__)

# Which fused kernels to use: unset or "all", "none", or a comma-separated list of
# FusedOps field names. For A/B measurements; the default is all of them.
FUSED_OPS_ENV = "TESSELLM_FUSED_OPS"


def fused_op_names(value: str | None) -> list[str] | None:
    """The ops ``TESSELLM_FUSED_OPS`` asks for: None for all, [] for none."""
    if value is None or value.strip().lower() == "all":
        return None
    if value.strip().lower() in ("", "none", "0"):
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    priority = 10
    distributed_backend = "nccl"
    attention_backends: ClassVar[tuple[str, ...]] = ("triton", "torch")
    warm_eager_steps: ClassVar[bool] = True  # Triton kernels compile per shape class
    graph_runner_serves_kv_groups: ClassVar[bool] = True  # a static table per group

    def __init__(self) -> None:
        self._peak_bytes: int | None = None
        self._device_index = 0

    @classmethod
    def probe(cls) -> Probe:
        return probe_cuda()

    @classmethod
    def is_available(cls) -> bool:
        return cls.probe().available

    @classmethod
    def unavailable_reason(cls) -> str:
        return cls.probe().reason

    @classmethod
    def available_reason(cls) -> str:
        return cls.probe().reason

    def device(self, local_rank: int = 0) -> torch.device:
        # Also the current device: Triton launches kernels on the current one.
        torch.cuda.set_device(local_rank)
        self._device_index = local_rank
        return torch.device(self.device_type, local_rank)

    def capability(self) -> tuple[int, int]:
        return torch.cuda.get_device_capability(self._device_index)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.capability() >= (8, 0) else torch.float16

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.capability() >= (8, 0):
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)

    # -- memory --------------------------------------------------------------------------
    def measure_peak_memory(self, run_profile: Callable[[], None]) -> None:
        index = self._device_index
        torch.cuda.synchronize(index)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(index)
        run_profile()
        torch.cuda.synchronize(index)
        self._peak_bytes = torch.cuda.max_memory_allocated(index)
        # Hand the profile's activations back so the KV cache can take that memory.
        torch.cuda.empty_cache()

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        """``utilization`` of the whole card, less this process's peak (weights and the
        profiled step's activations) and everything torch does not manage (the CUDA
        context, library workspaces, other processes on the card)."""
        index = self._device_index
        free, total = torch.cuda.mem_get_info(index)
        outside_torch = total - free - torch.cuda.memory_reserved(index)
        peak = self._peak_bytes
        if peak is None:  # no profiling pass: the weights are the floor
            peak = max(model_bytes, torch.cuda.memory_allocated(index))
        budget = int(total * utilization) - outside_torch - peak
        logger.info(
            "KV cache budget %.2f GiB = %.0f%% of %.2f GiB - peak %.2f GiB - non-torch %.2f GiB",
            budget / 2**30,
            utilization * 100,
            total / 2**30,
            peak / 2**30,
            outside_torch / 2**30,
        )
        return max(0, budget)

    # -- speed ---------------------------------------------------------------------------
    def graph_runner(
        self, model: nn.Module, attention: AttentionBackend, spec: GraphSpec
    ) -> GraphRunner | None:
        if not type(attention).graph_capturable:
            logger.info("no CUDA graphs: attention backend %r cannot be captured", attention.name)
            return None
        # Layers that read device values on the host (e.g. MoE expert row counts) declare
        # ``graph_capturable = False``; capturing them would fail.
        uncapturable = sorted(
            {type(m).__name__ for m in model.modules() if not getattr(m, "graph_capturable", True)}
        )
        if uncapturable:
            logger.info("no CUDA graphs: %s cannot be captured", ", ".join(uncapturable))
            return None
        from .graphs import CudaGraphRunner

        return CudaGraphRunner(model, attention, spec, torch.device("cuda", self._device_index))

    def default_quantization(self, dtype: torch.dtype) -> str | None:
        # Batch-1 decode is a GEMV per layer, and cuBLAS leaves bandwidth unused on the
        # small projections; the Triton GEMV keeps the dense weights as they are. fp32
        # stays on cuBLAS: it is the exact reference.
        return "unquantized_gemv" if dtype in (torch.bfloat16, torch.float16) else None

    def fused_ops(self, dtype: torch.dtype) -> FusedOps | None:
        names = fused_op_names(os.environ.get(FUSED_OPS_ENV))
        if names == []:
            return None
        try:
            from tessellm_triton_kernels.ops import triton_fused_ops
        except ImportError as exc:  # the kernels are an optional speed-up
            logger.warning("fused kernels unavailable (%s); using plain torch layers", exc)
            return None
        return triton_fused_ops(names)
