"""What the platform needs to know about each AMD GPU architecture, as data.

A device is named by its ``gcnArchName`` (``"gfx942:sramecc+:xnack-"``: the base name,
then target features). The facts kept per architecture are the ones a decision here
reads: the wavefront size (Triton's ``num_warps`` counts wavefronts on AMD, so a launch
tuned on NVIDIA's 32-thread warps has twice the threads on a 64-wide wavefront), which
fp8 variant the matrix cores compute in (MI300's are the "fnuz" formats: no negative
zero, NaN at 0x80, exponent bias one higher than OCP's; from MI350 and RDNA4 on, the OCP
formats NVIDIA also uses), and whether bf16 is worth defaulting to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessellm.interfaces.attention import canonical_kv_cache_dtype, kv_cache_torch_dtype


@dataclass(frozen=True, slots=True)
class RocmArch:
    gfx: str  # the base architecture name, e.g. "gfx942"
    products: str
    wavefront_size: int  # threads per wavefront as Triton compiles for the architecture
    fp8_e4m3: torch.dtype | None  # the matrix cores' e4m3 variant; None: no fp8 hardware
    fp8_e5m2: torch.dtype | None
    bf16: bool  # bf16 matrix instructions (else fp16 is the default run dtype)
    known: bool = True  # False: not in the table, facts derived from the name alone

    @property
    def ocp_fp8(self) -> bool:
        """Whether the hardware's fp8 is the OCP format of the shared KV cache layout."""
        return self.fp8_e4m3 == torch.float8_e4m3fn


_FNUZ = (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_OCP = (torch.float8_e4m3fn, torch.float8_e5m2)
_NO_FP8 = (None, None)

ARCHES: dict[str, RocmArch] = {
    a.gfx: a
    for a in (
        RocmArch("gfx906", "MI50, MI60 (Vega 20)", 64, *_NO_FP8, bf16=False),
        RocmArch("gfx908", "MI100 (CDNA)", 64, *_NO_FP8, bf16=True),
        RocmArch("gfx90a", "MI210, MI250, MI250X (CDNA2)", 64, *_NO_FP8, bf16=True),
        RocmArch("gfx940", "MI300 engineering samples (CDNA3)", 64, *_FNUZ, bf16=True),
        RocmArch("gfx941", "MI300 engineering samples (CDNA3)", 64, *_FNUZ, bf16=True),
        RocmArch("gfx942", "MI300X, MI300A, MI325X (CDNA3)", 64, *_FNUZ, bf16=True),
        RocmArch("gfx950", "MI350X, MI355X (CDNA4)", 64, *_OCP, bf16=True),
        RocmArch("gfx1100", "Radeon RX 7900, PRO W7900 (RDNA3)", 32, *_NO_FP8, bf16=True),
        RocmArch("gfx1101", "Radeon RX 7800, 7700 (RDNA3)", 32, *_NO_FP8, bf16=True),
        RocmArch("gfx1102", "Radeon RX 7600 (RDNA3)", 32, *_NO_FP8, bf16=True),
        RocmArch("gfx1200", "Radeon RX 9060 (RDNA4)", 32, *_OCP, bf16=True),
        RocmArch("gfx1201", "Radeon RX 9070, AI PRO R9700 (RDNA4)", 32, *_OCP, bf16=True),
    )
}


def base_arch(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``."""
    return gcn_arch_name.split(":", 1)[0].strip()


def gfx_name(target_version: int) -> str:
    """KFD's ``gfx_target_version`` (major * 10000 + minor * 100 + stepping, minor and
    stepping printed in hex) as an architecture name: 90402 -> gfx942, 90010 -> gfx90a."""
    major, minor, stepping = (
        target_version // 10000,
        target_version // 100 % 100,
        target_version % 100,
    )
    return f"gfx{major}{minor:x}{stepping:x}"


def lookup(gcn_arch_name: str) -> RocmArch:
    """The table's entry, or facts derived from the name for an architecture it lacks:
    Triton's wavefront rule (32 from gfx10 on, else 64), no fp8, and bf16 from gfx11 on
    (an unknown gfx9 part defaults to fp16, which every AMD GPU computes well)."""
    gfx = base_arch(gcn_arch_name)
    if gfx in ARCHES:
        return ARCHES[gfx]
    digits = gfx.removeprefix("gfx")[:-2]
    major = int(digits) if digits.isdigit() else 0
    wavefront = 32 if major >= 10 else 64
    return RocmArch(gfx, "unknown", wavefront, None, None, bf16=major >= 11, known=False)


@dataclass(frozen=True, slots=True)
class KvCacheFp8:
    """How an fp8 KV cache is kept on an architecture."""

    dtype: torch.dtype  # what the cache tensors hold
    hardware_conversion: bool  # whether the GPU converts that format in hardware
    reason: str


def kv_cache_fp8(arch: RocmArch, kv_cache_dtype: str) -> KvCacheFp8 | None:
    """The storage of an fp8 KV cache (None for ``"auto"``: the model's dtype).

    The cache holds the OCP formats of the shared layout (``tessellm.interfaces.attention``)
    everywhere, MI300 included: the Triton backend writes them with integer arithmetic and
    reads them by their bits on ROCm, so they need no fp8 hardware. MI300's own e4m3fnuz
    would not do as storage: the same bits mean half the value there (exponent bias 8, not
    7), so a cache and its scales would not carry over between GPUs or checkpoints."""
    name = canonical_kv_cache_dtype(kv_cache_dtype)
    if name == "auto":
        return None
    dtype = kv_cache_torch_dtype(name, torch.float32)
    native = dtype in (arch.fp8_e4m3, arch.fp8_e5m2)
    if native:
        reason = f"{arch.gfx} computes in OCP fp8: the cache's format is its own"
    elif arch.fp8_e4m3 is None:
        reason = f"{arch.gfx} has no fp8 hardware: the cache's bytes are converted in software"
    else:
        own = arch.fp8_e4m3 if dtype == torch.float8_e4m3fn else arch.fp8_e5m2
        hw = str(own).removeprefix("torch.")
        reason = (
            f"{arch.gfx} computes in {hw}; the cache keeps the shared OCP format, converted "
            "in software (fnuz bits read as OCP would be half the value)"
        )
    return KvCacheFp8(dtype, native, reason)
