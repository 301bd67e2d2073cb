"""Google TPUs through torch_xla: the ``xla`` device, the ``xla`` collective backend.

Detection only looks for torch_xla on the import path and for a TPU device node; it never
imports torch_xla (that starts the TPU runtime). Attention uses the portable torch
backend. Not yet run on a TPU: see docs/cuda.md for what was and was not tested.
"""

from __future__ import annotations

import glob
import importlib.util
from functools import cache
from typing import ClassVar

import torch

from tessellm.interfaces.platform import Platform

# TPU VMs expose their chips as /dev/accel* (v2-v4) or through VFIO (v5e and later).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def tpu_device_nodes() -> list[str]:
    return [path for pattern in TPU_DEVICE_GLOBS for path in glob.glob(pattern)]


@cache
def probe_tpu() -> tuple[bool, str]:
    if importlib.util.find_spec("torch_xla") is None:
        return False, "torch_xla is not installed (pip install 'tessellm-tpu[xla]')"
    if not tpu_device_nodes():
        return False, "torch_xla is installed but no TPU device node (/dev/accel*, /dev/vfio)"
    return True, "torch_xla and a TPU device node found"


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    priority = 10
    distributed_backend = "xla"
    attention_backends: ClassVar[tuple[str, ...]] = ("torch",)

    @classmethod
    def is_available(cls) -> bool:
        return probe_tpu()[0]

    @classmethod
    def unavailable_reason(cls) -> str:
        return probe_tpu()[1]

    def device(self, local_rank: int = 0) -> torch.device:
        import torch_xla

        return torch_xla.device()

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(self.device())
        # torch_xla 2.x reports bytes; older releases reported kilobytes.
        if "bytes_limit" in info:
            total, used = int(info["bytes_limit"]), int(info["bytes_used"])
        else:
            total = int(info["kb_total"]) * 1024
            used = total - int(info["kb_free"]) * 1024
        return max(0, int(total * utilization) - max(used, model_bytes))
