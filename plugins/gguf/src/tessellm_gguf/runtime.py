"""Quantized GGUF matrices in the form each device multiplies them in.

A linear layer holds one or more *segments*, each a run of output rows (adjacent fused
checkpoint matrices of one kind are merged into one segment):

- ``Int4KernelSegment`` (CPU, bf16): torch's int4 CPU kernel, groups of 32 with a scale
  and zero, ``w = (q - 8) * scale + zero``. 4-bit codes (Q4_0, Q4_1, Q4_K) map onto it
  exactly (``zero + 8 scale``). 5- and 8-bit codes (Q5_0, Q5_1, Q5_K, Q8_0) are split
  into two 4-bit halves, ``c - o = 16 a + b`` (``o`` = 128 for 8-bit codes, else 0),
  stored along a doubled input, so one kernel call over ``[x | x]`` computes
  ``16 s (a' - 8) + s (b - 8) + (z + o s + 8 s)`` with ``a' = a + 8``: every term exact.
- ``DequantSegment`` (any device): codes kept (two per byte at 4 bits), dequantized to
  the run dtype in chunks of rows at each call and multiplied densely; no dense copy
  outlives the call. Q6_K takes this path on the CPU (its scales cover 16 inputs and the
  kernel's smallest group is 32), and so does every type in fp32, where the int4
  kernel's fp32 path is not vectorized (measured: 2x slower than a dequantize per
  call at one row, which is itself ~13x slower than a dense fp32 matmul; with
  ``TESSELLM_GGUF_CPU_FP32=bf16`` fp32 models use the bf16 kernel instead), and any
  matrix whose shape the kernel refuses.
- ``TritonSegment`` (CUDA, ``triton_matmul.py``): the codes, scales and zeros read by a
  Triton dequantize-and-multiply kernel.
- ``DenseSegment``: matrices the file stores unquantized (F32/F16/BF16).

On the CPU a quantized segment may also keep a *dense copy* (``DenseCopyBudget``): the
dequantized matrix, multiplied instead of the codes when a call has more than
``DENSE_COPY_MAX_PACKED_ROWS`` rows (prefill chunks, large decode batches). The int4
kernel's cost grows about linearly with the rows while a dense GEMM's grows slower
(2-core Zen 2, SmolLM2's matrices, bf16 int4 kernel against an fp32 GEMM: the kernel 1.2x
faster at 1 row and ~1.3x at 8, the GEMM 1.2x faster at 16 rows and 1.3-1.7x at 24-64),
so serving steps that carry a prompt or 17+ sequences run at dense speed while one
sequence still reads 4-bit weights. The copy is fp32 on CPUs without AVX-512 (their bf16
GEMMs are emulated) and the run dtype on AVX-512 ones, and costs memory: 4 (or 2) bytes a
weight, kept only within the budget (``TESSELLM_GGUF_CPU_DENSE``).

Eager calls multiply the copy in oneDNN's blocked layout (``OneDnnWeight``, made once
at load from what the budget has left after every dense copy: ``add_onednn_copies``);
traces (the CPU's compiled decode libraries take the weights as inputs) keep the plain
copy.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tessellm_gguf.blocks import GroupedCodes
from tessellm_quant_int4.cpu_int4 import GROUP_SIZE as KERNEL_GROUP
from tessellm_quant_int4.cpu_int4 import INT4_MM, int4_matmul
from tessellm_quant_int4.onednn_weight import OneDnnWeight, dense_linear

# Run dtypes in which the CPU uses the int4 kernel (its fp32 path is scalar code).
INT4_KERNEL_DTYPES = (torch.bfloat16,)
# ``bf16``: fp32 models run the int4 kernel too, on bf16-rounded activations and scales
# (dense-fp32 speed at one row, bf16 matmul precision); unset: exact dequantize per call.
FP32_KERNEL_ENV = "TESSELLM_GGUF_CPU_FP32"


def kernel_dtype(run_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the CPU int4 kernel runs in for a model in ``run_dtype`` (None: none)."""
    if run_dtype in INT4_KERNEL_DTYPES:
        return run_dtype
    if run_dtype == torch.float32 and os.environ.get(FP32_KERNEL_ENV, "") == "bf16":
        return torch.bfloat16
    return None


# Calls with more rows than this use a segment's dense copy (compiled decode steps split
# their batch ranges at the same point: tessellm_cpu.compiled_decode.BATCH_RANGES).
DENSE_COPY_MAX_PACKED_ROWS = 16
# ``auto`` (default): dense copies while the model's copies total at most
# DENSE_COPY_AUTO_BYTES (a small model's prefill and big batches at dense speed, a large
# model's memory left to the KV cache); ``on``: every quantized CPU segment; ``off``: none.
DENSE_COPY_ENV = "TESSELLM_GGUF_CPU_DENSE"
DENSE_COPY_AUTO_BYTES = 1 << 30


def dense_copy_dtype(run_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a CPU dense copy: GEMMs in bf16/fp16 are emulated without AVX-512."""
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return run_dtype
    return torch.float32


class DenseCopyBudget:
    """How many bytes of dense copies one model may still keep (see the module docstring);
    the quantization method holds one per model, its layers draw from it in load order."""

    def __init__(self, setting: str | None = None) -> None:
        setting = (setting or os.environ.get(DENSE_COPY_ENV, "auto")).strip().lower()
        if setting not in ("auto", "on", "off"):
            raise ValueError(f"{DENSE_COPY_ENV} must be auto, on or off, not {setting!r}")
        self.left = {"auto": DENSE_COPY_AUTO_BYTES, "on": 1 << 62, "off": 0}[setting]
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            self.left = 0  # later layers would fit unevenly: stop at the first refusal
            return False
        self.left -= nbytes
        self.used += nbytes
        return True


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


# A DequantSegment's temporary dense weight stays under this many elements per chunk.
DEQUANT_CHUNK_ELEMENTS = 1 << 20


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes below 16 as ``[N, K / 2]`` bytes, even inputs in the low nibble."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)


class DenseSegment(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@torch.library.custom_op("tessellm_gguf::dequant_linear", mutates_args=())
def dequant_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    nibbles: bool,
    chunk_rows: int,
) -> torch.Tensor:
    """``x @ W.T`` for ``W = code * scale + zero`` dequantized by chunks of ``chunk_rows``
    output rows: fp32 arithmetic (exact for every kept type), one rounding to ``x``'s
    dtype. An opaque op: a compiled decode step (AOTInductor) calls it as it is, where
    inlining the dequantization into its own matmul loops ran 15x slower than eager."""
    n = codes.shape[0]
    in_features = scale.shape[1] * group

    def rows(start: int, stop: int) -> torch.Tensor:
        c = unpack_nibbles(codes[start:stop]) if nibbles else codes[start:stop]
        w = c.view(stop - start, -1, group).float()
        w = w.mul_(scale[start:stop, :, None]).add_(zero[start:stop, :, None])
        return w.view(stop - start, in_features).to(x.dtype)

    if n <= chunk_rows:
        return F.linear(x, rows(0, n))
    parts = [F.linear(x, rows(i, min(i + chunk_rows, n))) for i in range(0, n, chunk_rows)]
    return torch.cat(parts, dim=-1)


@dequant_linear.register_fake
def _dequant_linear_shape(x, codes, scale, zero, group, nibbles, chunk_rows):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


class DequantSegment(nn.Module):
    def __init__(self, g: GroupedCodes, dense: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("dense", dense)
        self.onednn: OneDnnWeight | None = None  # add_onednn_copies
        self.out_features, self.in_features = g.codes.shape
        self.group, self.nibbles = g.group, g.bits <= 4
        codes = pack_nibbles(g.codes) if self.nibbles else g.codes
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", g.scale.float().contiguous())
        self.register_buffer("zero", g.zero.float().contiguous())
        self.chunk_rows = max(1, DEQUANT_CHUNK_ELEMENTS // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and rows_of(x) > DENSE_COPY_MAX_PACKED_ROWS:
            return dense_linear(x, self.dense, self.onednn)
        return torch.ops.tessellm_gguf.dequant_linear(
            x, self.codes, self.scale, self.zero, self.group, self.nibbles, self.chunk_rows
        )


def int4_kernel_fits(g: GroupedCodes, dtype: torch.dtype) -> bool:
    return (
        kernel_dtype(dtype) is not None
        and g.group == KERNEL_GROUP
        and g.bits <= 8
        and g.codes.shape[0] % 16 == 0
        and g.codes.shape[1] % KERNEL_GROUP == 0
    )


class Int4KernelSegment(nn.Module):
    def __init__(
        self, g: GroupedCodes, dtype: torch.dtype, dense: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("dense", dense)
        self.onednn: OneDnnWeight | None = None  # add_onednn_copies
        self.out_features, self.in_features = g.codes.shape
        s, z = g.scale, g.zero
        if g.bits <= 4:
            self.halves = 1
            nibbles, scales, zeros = g.codes, s, z + 8 * s
        else:
            self.halves = 2
            offset = 128 if g.bits == 8 else 0
            signed = g.codes.to(torch.int16) - offset
            high = torch.div(signed, 16, rounding_mode="floor")
            low = signed - 16 * high
            nibbles = torch.cat((high + 8, low), dim=1)
            scales = torch.cat((16 * s, s), dim=1)
            zeros = torch.cat((torch.zeros_like(z), z + (offset + 8) * s), dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            nibbles.to(torch.int32).contiguous(), 1
        )
        scales_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and rows_of(x) > DENSE_COPY_MAX_PACKED_ROWS:
            return dense_linear(x, self.dense, self.onednn)
        if x.dim() == 2 and self.halves == 1 and x.dtype == self.scales_zeros.dtype:
            # The decode step's case, kept lean: one kernel call.
            return INT4_MM(x.contiguous(), self.packed, KERNEL_GROUP, self.scales_zeros)
        rows = x.reshape(-1, self.in_features)
        if self.halves == 2:
            rows = torch.cat((rows, rows), dim=1)
        out = int4_matmul(rows, self.packed, self.scales_zeros, None)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def segment_kind(part: GroupedCodes | torch.Tensor, device: torch.device, dtype) -> tuple:
    """Adjacent matrices of one kind share a segment."""
    if isinstance(part, torch.Tensor):
        return ("dense",)
    if device.type == "cuda":
        return ("triton", part.group, part.bits <= 4)
    if int4_kernel_fits(part, dtype):
        return ("int4", part.bits <= 4)
    return ("dequant", part.group, part.bits <= 4)


def build_segment(
    part: GroupedCodes | torch.Tensor, kind: tuple, dtype, budget: DenseCopyBudget | None
) -> nn.Module:
    if kind[0] == "dense":
        return DenseSegment(part.to(dtype))
    if kind[0] == "triton":
        from tessellm_gguf.triton_matmul import TritonSegment

        return TritonSegment(part)
    dense = None
    copy_dtype = dense_copy_dtype(dtype)
    if budget is not None and budget.take(part.codes.numel() * copy_dtype.itemsize):
        dense = part.dequantize().to(copy_dtype)  # exact scales: the kernel's are rounded
    if kind[0] == "int4" and int4_kernel_fits(part, dtype):  # merged rows still fit
        return Int4KernelSegment(part, kernel_dtype(dtype), dense)
    return DequantSegment(part, dense)


def add_onednn_copies(model: nn.Module, budget: DenseCopyBudget) -> int:
    """Blocked copies of the dense copies, in model order, while ``budget`` lasts (drawn
    after every layer took its dense copy: those matter more). Returns how many."""
    added = 0
    for module in model.modules():
        dense = getattr(module, "dense", None)
        if not isinstance(module, (Int4KernelSegment, DequantSegment)) or dense is None:
            continue
        if not OneDnnWeight.fits(dense) or not budget.take(dense.numel() * dense.element_size()):
            break
        module.onednn = OneDnnWeight(dense)
        added += 1
    return added


class GGUFLinearRuntime(nn.Module):
    """The segments of one linear layer, applied in output order."""

    def __init__(
        self,
        parts: list[GroupedCodes | torch.Tensor],
        device: torch.device,
        dtype,
        dense_budget: DenseCopyBudget | None = None,
    ) -> None:
        super().__init__()
        runs: list[tuple[tuple, list]] = []
        for part in parts:
            kind = segment_kind(part, device, dtype)
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(part)
            else:
                runs.append((kind, [part]))
        segments = []
        for kind, members in runs:
            if kind[0] == "dense":
                merged = torch.cat(members)
            else:
                merged = GroupedCodes.cat(members) if len(members) > 1 else members[0]
            budget = dense_budget if device.type == "cpu" else None
            segments.append(build_segment(merged, kind, dtype, budget))
        self.segments = nn.ModuleList(segments)
        self.kinds = [type(s).__name__ for s in segments]
        # Bound forwards, called without nn.Module's per-call machinery (decode steps
        # call hundreds of these per token).
        self._forwards = [s.forward for s in segments]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self._forwards) == 1:
            return self._forwards[0](x)
        return torch.cat([forward(x) for forward in self._forwards], dim=-1)
