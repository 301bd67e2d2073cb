"""Google TPUs through torch_xla: the ``xla`` device, the ``xla`` collective backend.

Detection looks for torch_xla on the import path, then for a TPU device node or
``PJRT_DEVICE=CPU`` (XLA's CPU device, which compiles and runs the same programs: how
CI proves this platform); it never imports torch_xla (that starts the runtime).

Steps run through :class:`~tessellm_tpu.step_runner.XlaStepRunner` (static shapes, the
whole step one compiled program) with the ``xla`` attention backend; any other backend
asked for by name runs eagerly, tracing and compiling per batch shape.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from contextlib import AbstractContextManager
from functools import cache
from typing import TYPE_CHECKING, ClassVar

import torch

from tessellm.config import default_cache_dir
from tessellm.errors import ConfigError
from tessellm.interfaces.platform import Platform, StepRunner

if TYPE_CHECKING:
    from tessellm.engine.model_runner import ModelRunner

# TPU VMs expose their chips as /dev/accel* (v2-v4) or through VFIO (v5e and later).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
# XLA's CPU device keeps the KV cache in host memory shared with everything else: a
# test device, so its cache is kept small.
XLA_CPU_KV_CACHE_CAP = 256 << 20


def tpu_device_nodes() -> list[str]:
    return [path for pattern in TPU_DEVICE_GLOBS for path in glob.glob(pattern)]


def on_xla_cpu() -> bool:
    return os.environ.get("PJRT_DEVICE", "").upper() == "CPU"


@cache
def probe_tpu() -> tuple[bool, str]:
    """(available, why): torch_xla installed, and a TPU device node or ``PJRT_DEVICE=CPU``."""
    if importlib.util.find_spec("torch_xla") is None:
        return False, "torch_xla is not installed (pip install 'tessellm-tpu[xla]')"
    pjrt = os.environ.get("PJRT_DEVICE", "").upper()
    if pjrt == "CPU":
        return True, "torch_xla with PJRT_DEVICE=CPU: XLA's CPU device (for tests, not speed)"
    if pjrt not in ("", "TPU"):
        return False, f"PJRT_DEVICE={pjrt}: this platform runs torch_xla on a TPU or XLA's CPU"
    if not tpu_device_nodes():
        return False, (
            "torch_xla is installed but there is no TPU device node (/dev/accel*, /dev/vfio) "
            "and PJRT_DEVICE is not CPU"
        )
    return True, "torch_xla and a TPU device node found"


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    priority = 10
    distributed_backend = "xla"
    attention_backends: ClassVar[tuple[str, ...]] = ("xla", "torch")

    @classmethod
    def is_available(cls) -> bool:
        return probe_tpu()[0]

    @classmethod
    def unavailable_reason(cls) -> str:
        return probe_tpu()[1]

    @classmethod
    def available_reason(cls) -> str:
        return probe_tpu()[1]

    def device(self, local_rank: int = 0) -> torch.device:
        import torch_xla

        return torch_xla.device()

    def set_up_process(self) -> None:
        # On a TPU, compiled programs persist on disk (keyed by their HLO), so a restarted
        # server finds its start-up compilations there (as vLLM's torch-xla backend did).
        # XLA's CPU client reloads none (measured: the same compile time on a rerun).
        if on_xla_cpu():
            return
        import torch_xla
        import torch_xla.runtime as xr

        if not torch_xla._XLAC._xla_computation_cache_is_initialized():
            xr.initialize_cache(str(default_cache_dir() / f"xla-{torch_xla.__version__}"))

    def inference_mode(self) -> AbstractContextManager[object]:
        # XLA tensors made under inference_mode cannot be updated in place (weights, KV).
        return torch.no_grad()

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def step_runner(self, runner: ModelRunner) -> StepRunner | None:
        from tessellm_tpu.attention import XlaPagedAttention
        from tessellm_tpu.step_runner import XlaStepRunner

        if not isinstance(runner.attention, XlaPagedAttention):
            return None  # another backend runs eagerly (the core runner's path)
        if runner.parallel.world_size > 1:
            raise ConfigError(
                "tensor parallelism is not implemented on the tpu platform (one device per "
                "engine): use tensor_parallel_size=1"
            )
        return XlaStepRunner(runner)  # type: ignore[return-value]

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        if on_xla_cpu():  # no device memory statistics on XLA's CPU device
            free = mem_available_bytes() * utilization - model_bytes
            return int(max(0, min(free, XLA_CPU_KV_CACHE_CAP)))
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(self.device())
        # torch_xla 2.x reports bytes; older releases reported kilobytes.
        if "bytes_limit" in info:
            total, used = int(info["bytes_limit"]), int(info["bytes_used"])
        else:
            total = int(info["kb_total"]) * 1024
            used = total - int(info["kb_free"]) * 1024
        return max(0, int(total * utilization) - max(used, model_bytes))
