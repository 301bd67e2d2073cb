"""Cheap detection of usable NVIDIA GPUs, without initialising CUDA.

``torch.cuda.is_available()`` asks the CUDA runtime, which loads the driver and, in some
set-ups, makes a later ``fork`` unsafe. NVML (the library behind ``nvidia-smi``) answers
the same question through a few C calls, so detection asks it first and falls back to
torch only where NVML is missing (Jetson boards have CUDA but no NVML).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache

import torch

NVML_LIBRARY = "libnvidia-ml.so.1"


@dataclass(frozen=True, slots=True)
class Probe:
    available: bool
    reason: str  # why not, or what was found


def nvml_device_count() -> int | None:
    """Number of NVIDIA devices the driver reports, or None when NVML cannot answer."""
    try:
        lib = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    count = ctypes.c_uint(0)
    try:
        status = lib.nvmlDeviceGetCount_v2(ctypes.byref(count))
    finally:
        lib.nvmlShutdown()
    return int(count.value) if status == 0 else None


def visible_device_count(physical: int, visible_env: str | None) -> int:
    """How many of ``physical`` devices ``CUDA_VISIBLE_DEVICES`` leaves visible.

    As CUDA reads it: entries up to the first invalid one count (an index out of range,
    a negative index or an empty entry ends the list); UUID entries (``GPU-...``,
    ``MIG-...``) are taken as valid.
    """
    if visible_env is None:
        return physical
    count = 0
    for entry in visible_env.split(","):
        entry = entry.strip()
        if entry.startswith(("GPU-", "MIG-")):
            count += 1
            continue
        if not entry.isdigit() or int(entry) >= physical:
            break
        count += 1
    return count


def probe_cuda_build() -> Probe:
    if getattr(torch.version, "hip", None):
        return Probe(False, "this torch is a ROCm (HIP) build; the rocm platform serves it")
    if not torch.version.cuda:
        return Probe(False, f"this torch ({torch.__version__}) is built without CUDA")
    return Probe(True, f"torch built with CUDA {torch.version.cuda}")


@cache
def probe_cuda() -> Probe:
    """Whether a CUDA device can be used here, and why not (memoised per process)."""
    build = probe_cuda_build()
    if not build.available:
        return build
    physical = nvml_device_count()
    if physical is None:
        # No NVML: ask the runtime (this loads the driver, which is what we avoid above).
        if torch.cuda.is_available():
            return Probe(True, f"{torch.cuda.device_count()} device(s) (CUDA runtime)")
        return Probe(False, "no NVML library and the CUDA runtime finds no device")
    if physical == 0:
        return Probe(False, "NVML reports no NVIDIA GPU")
    visible = visible_device_count(physical, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible == 0:
        return Probe(False, f"CUDA_VISIBLE_DEVICES hides all {physical} GPU(s)")
    return Probe(True, f"{visible} of {physical} GPU(s) visible (NVML)")
