"""AMD GPUs through a ROCm (HIP) build of torch, which exposes them as ``cuda`` devices.

Everything past detection is the CUDA platform's logic: torch's HIP build answers the same
``torch.cuda`` calls (memory, graphs), RCCL stands behind the ``nccl`` backend name, and
the Triton kernels compile for AMD GPUs. Not yet run on AMD hardware: see docs/cuda.md.
"""

from __future__ import annotations

import glob
import os
from functools import cache
from typing import ClassVar

import torch

from tessellm_cuda.detect import Probe
from tessellm_cuda.platform import CudaPlatform

KFD_DEVICE = "/dev/kfd"  # the amdgpu driver's compute interface


def render_nodes() -> list[str]:
    return glob.glob("/dev/dri/renderD*")


@cache
def probe_rocm() -> Probe:
    hip = getattr(torch.version, "hip", None)
    if not hip:
        return Probe(False, f"this torch ({torch.__version__}) is not a ROCm (HIP) build")
    if not os.path.exists(KFD_DEVICE):
        return Probe(False, f"{KFD_DEVICE} is missing: no amdgpu kernel driver")
    nodes = render_nodes()
    if not nodes:
        return Probe(False, "no GPU render node under /dev/dri")
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None and value.strip() in ("", "-1"):
            return Probe(False, f"{var}={value!r} hides every GPU")
    return Probe(True, f"HIP {hip}, {len(nodes)} render node(s)")


class RocmPlatform(CudaPlatform):
    name = "rocm"
    device_type = "cuda"  # what torch's HIP build calls its devices
    priority = 10
    distributed_backend = "nccl"  # RCCL, under the name torch gives it
    attention_backends: ClassVar[tuple[str, ...]] = ("triton", "torch")

    @classmethod
    def probe(cls) -> Probe:
        return probe_rocm()

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if torch.cuda.is_bf16_supported():
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)
