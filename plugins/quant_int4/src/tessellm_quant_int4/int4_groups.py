"""Where loaded 4-bit group-quantized weights run: the CPU's int4 kernel, the Triton
kernels on CUDA, or a dequantize-per-call path for what neither takes.

A format's method unpacks its checkpoint tensors to :class:`QuantizedGroups` (one
layout for GPTQ and AWQ) and :func:`install` repacks that for the layer's device,
replacing the checkpoint tensors; :func:`int4_linear` multiplies. No path keeps a dense
weight: the dequantizing path rebuilds one layer's weight per call and drops it.

torch's int4 CPU kernel is vectorized (AVX2, AVX-512) for bf16 only on x86; fp32 and
fp16 run a scalar loop there, 20-80x slower than the bf16 kernel (2048x2048 layer, one
AVX2 core: 47 ms per row in fp32, 0.6 ms in bf16; 7.6 s for 128 rows). Dequantizing the
layer per call and running the dense fp32 matmul beats it at every batch (~18 ms a call
there), so x86 fp32/fp16 runs take that path; on Arm the kernel's NEON loop serves
every dtype.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

import torch
from torch import nn

from tessellm_quant_int4.cpu_int4 import int4_matmul, pack_quantized_groups
from tessellm_quant_int4.formats import pack_along_rows

logger = logging.getLogger(__name__)


@dataclass
class QuantizedGroups:
    """``w[n, perm[k]] = (q[k, n] - zeros[g, n]) * scales[g, n]``, ``g = group_of_input[k]``:
    inputs in kernel order (grouped; ``perm`` None: the layer's own order)."""

    q: torch.Tensor  # [K, N], values 0..15
    zeros: torch.Tensor  # [groups, N], 0..15
    scales: torch.Tensor  # [groups, N]
    group_of_input: torch.Tensor  # [K] int64
    perm: torch.Tensor | None = None

    @classmethod
    def grouped(
        cls,
        q: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        group_of_input: torch.Tensor,
    ) -> QuantizedGroups:
        """From tensors in the layer's input order; inputs sorted by group (act-order)."""
        group_of_input = group_of_input.long()
        if bool((group_of_input[1:] >= group_of_input[:-1]).all()):
            return cls(q, zeros, scales, group_of_input)
        perm = torch.argsort(group_of_input, stable=True)
        return cls(q[perm], zeros, scales, group_of_input[perm], perm)

    def dense(self) -> torch.Tensor:
        """The ``[N, K]`` weight in the layer's input order, in fp32."""
        g = self.group_of_input
        w = (self.q.float() - self.zeros[g].float()) * self.scales[g].float()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.t()

    def uniform_group_size(self) -> int | None:
        """``G`` with ``group_of_input[k] == k // G`` (the Triton kernels' indexing), a
        multiple of 32 or the whole input; None where the groups are not so."""
        in_features = self.q.shape[0]
        first = self.group_of_input
        if bool((first == first[0]).all()):
            return max(in_features, 32) if int(first[0]) == 0 else None
        size = int((first == 0).sum())
        expected = torch.arange(in_features, device=first.device) // size
        return size if size % 32 == 0 and bool((first == expected).all()) else None


def _triton_ready(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning(
            "4-bit weights on CUDA without triton run dequantized per call (slow): "
            "pip install 'tessellm-quant-int4[cuda]'"
        )
        return False
    return True


def cpu_kernel_fast(dtype: torch.dtype) -> bool:
    """Whether torch's int4 CPU kernel is vectorized for ``dtype`` here (module doc)."""
    return dtype == torch.bfloat16 or platform.machine().lower() in ("aarch64", "arm64")


def _scales_storage(scales: torch.Tensor) -> torch.Tensor:
    """fp16 where that is exact (checkpoints store fp16), else fp32."""
    half = scales.half()
    return half if bool((half.float() == scales.float()).all()) else scales.float()


def install(layer: nn.Module, groups: QuantizedGroups, dtype: torch.dtype) -> str:
    """Repack ``groups`` for the layer's device and set ``layer.int4_path``: ``"cpu"``
    (torch's int4 kernel), ``"triton"`` or ``"dequantize"``. Returns the path."""
    device = groups.q.device
    buffers: dict[str, torch.Tensor | None] = {"int4_perm": groups.perm}
    packed = None
    if device.type == "cpu" and cpu_kernel_fast(dtype):
        packed = pack_quantized_groups(
            groups.q, groups.zeros, groups.scales, groups.group_of_input, dtype
        )
    size = groups.uniform_group_size()
    if packed is not None:
        buffers["int4_packed"], buffers["int4_scales_zeros"], layer.int4_group_size = packed
        layer.int4_path = "cpu"
    elif size is not None and _triton_ready(device):
        buffers["int4_packed"] = pack_along_rows(groups.q)
        buffers["int4_scales"] = _scales_storage(groups.scales)
        buffers["int4_zeros"] = groups.zeros.to(torch.uint8)
        layer.int4_group_size = size
        layer.int4_path = "triton"
    else:
        buffers.update(_dequantize_buffers(groups, size))
        layer.int4_path = "dequantize"
    for name, tensor in buffers.items():
        if tensor is None:  # a None buffer trips torch.export (the CPU's compiled decode)
            setattr(layer, name, None)
        else:
            layer.register_buffer(name, tensor, persistent=False)
    return layer.int4_path


def _dequantize_buffers(groups: QuantizedGroups, size: int | None) -> dict[str, torch.Tensor]:
    """Two inputs per byte (``[K/2, N]``, input ``2 i`` in the low nibble), fp32 scales
    and ``-zero * scale``; the group of each input only where the groups are not
    ``size`` consecutive inputs each."""
    q = groups.q.to(torch.uint8)
    if q.shape[0] % 2:
        q = torch.cat((q, torch.zeros_like(q[:1])))
    scales = groups.scales.float()
    buffers = {
        "int4_packed": (q[0::2] | (q[1::2] << 4)).contiguous(),
        "int4_scales": scales,
        "int4_zero_scales": -groups.zeros.float() * scales,
    }
    in_features = groups.q.shape[0]
    if size is None or in_features % size or in_features // size != scales.shape[0]:
        buffers["int4_groups"] = groups.group_of_input
    return buffers


def _dequantized_weight(layer: nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``[K, N]`` weight in kernel input order, rebuilt for one call."""
    packed = layer.int4_packed
    q = torch.stack((packed & 15, packed >> 4), dim=1).view(-1, packed.shape[1])[:in_features]
    scales, zero_scales = layer.int4_scales, layer.int4_zero_scales
    groups = getattr(layer, "int4_groups", None)
    if groups is not None:
        w = torch.addcmul(zero_scales[groups], q.float(), scales[groups])
    else:
        grouped = q.view(scales.shape[0], -1, q.shape[1]).float()
        w = torch.addcmul(zero_scales[:, None], grouped, scales[:, None]).view_as(q)
    return w.to(dtype)


def int4_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a layer :func:`install` prepared."""
    rows = x.reshape(-1, x.shape[-1])
    if layer.int4_perm is not None:
        rows = rows.index_select(1, layer.int4_perm)
    path = layer.int4_path
    if path == "cpu":
        out = int4_matmul(
            rows, layer.int4_packed, layer.int4_scales_zeros, None, layer.int4_group_size
        )
        out = out.to(x.dtype)
    elif path == "triton":
        from tessellm_quant_int4.triton_int4 import int4_group_matmul

        out = int4_group_matmul(
            rows, layer.int4_packed, layer.int4_scales, layer.int4_zeros, layer.int4_group_size
        )
    else:
        out = rows @ _dequantized_weight(layer, rows.shape[1], x.dtype)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out + bias if bias is not None else out
