"""Cheap detection of usable AMD GPUs, without initialising HIP.

The amdgpu driver's compute interface (KFD) publishes its topology in sysfs: one node per
CPU socket and per GPU, a GPU's ``properties`` giving a non-zero ``gfx_target_version``.
Reading it is what ``rocminfo`` does, and costs a few file reads, where
``torch.cuda.is_available()`` would start the HIP runtime (as NVML spares the CUDA
platform from starting CUDA). Only where the topology cannot be read does detection ask
the runtime.
"""

from __future__ import annotations

import glob
import os
from functools import cache
from pathlib import Path

import torch

from tessellm_cuda.detect import Probe

from .arch import gfx_name

KFD_DEVICE = "/dev/kfd"  # the amdgpu driver's compute interface
KFD_TOPOLOGY = "/sys/class/kfd/kfd/topology/nodes"
VISIBILITY_VARIABLES = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def render_nodes() -> list[str]:
    return glob.glob("/dev/dri/renderD*")


def kfd_gpu_archs(topology: str | None = None) -> list[str] | None:
    """The architecture names of the GPU nodes in KFD's topology; None when it has no
    readable node (no driver, or a container without that part of sysfs)."""
    root = Path(topology or KFD_TOPOLOGY)
    archs: list[str] = []
    readable = False
    for properties in sorted(root.glob("*/properties")):
        try:
            text = properties.read_text()
        except OSError:
            continue
        readable = True
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "gfx_target_version" and value.strip().isdigit() and int(value) != 0:
                archs.append(gfx_name(int(value)))
    return archs if readable else None


def probe_hip_build() -> Probe:
    hip = getattr(torch.version, "hip", None)
    if not hip:
        return Probe(False, f"this torch ({torch.__version__}) is not a ROCm (HIP) build")
    return Probe(True, f"torch built with HIP {hip}")


@cache
def probe_rocm() -> Probe:
    """Whether an AMD GPU can be used here, and why not (memoised per process)."""
    build = probe_hip_build()
    if not build.available:
        return build
    if not os.path.exists(KFD_DEVICE):
        return Probe(False, f"{KFD_DEVICE} is missing: no amdgpu kernel driver")
    if not render_nodes():
        return Probe(False, "no GPU render node under /dev/dri")
    for var in VISIBILITY_VARIABLES:
        value = os.environ.get(var)
        if value is not None and value.strip() in ("", "-1"):
            return Probe(False, f"{var}={value!r} hides every GPU")
    archs = kfd_gpu_archs()
    if archs is None:
        # No topology to read: ask the runtime (this starts HIP, which is what we avoid).
        if torch.cuda.is_available():
            return Probe(True, f"{torch.cuda.device_count()} device(s) (HIP runtime)")
        return Probe(False, "no KFD topology and the HIP runtime finds no device")
    if not archs:
        return Probe(False, "KFD's topology lists no GPU node")
    kinds = ", ".join(sorted(set(archs)))
    return Probe(True, f"HIP {torch.version.hip}, {len(archs)} GPU(s) ({kinds}) in KFD's topology")
