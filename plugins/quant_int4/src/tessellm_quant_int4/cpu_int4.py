"""torch's int4 CPU kernel: packing ``[N, K]`` weights into its layout and multiplying.

``_weight_int4pack_mm_for_cpu`` takes 4-bit weights in groups of ``GROUP_SIZE`` input
features, each group with a scale and a zero point, ``w = (q - 8) * scale + zero``.
Weights already quantized to other groups (GPTQ/AWQ) are packed by their own methods with
the same kernel; this module holds the min/max packer the weight-only methods use and the
8-bit-in-two-halves packer of the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm_quant_int4.onednn_weight import OneDnnWeight, dense_linear

GROUP_SIZE = 32


DENSE_FROM_ROWS = 17  # where the dense kernels win, where they can (see packed_max_rows)


def packed_max_rows(capability: str, dtype: torch.dtype) -> int:
    """Up to this many rows per matmul use the packed weight, beyond it the dense weight.

    On AVX-512 the dense kernels win past 16 rows (2-core AVX-512 machine: int4 ~4x faster
    at 1 row, even at 16, slower at 64), and fp32 GEMMs are fast on any x86 CPU. Without
    AVX-512, bf16/fp16 GEMMs are emulated and int4 wins at every size measured (2-core Zen
    2, SmolLM2's matmuls in bf16: 5x at 16-24 rows, 2-4x at 64-512), so there the packed
    weight serves prefill and large batches too."""
    if capability.startswith("AVX512") or dtype == torch.float32:
        return DENSE_FROM_ROWS - 1
    return 1 << 62


CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
PACKED_MAX_ROWS = {
    dtype: packed_max_rows(CPU_CAPABILITY, dtype)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
}
# A group lies on a 4-bit grid when re-quantizing moves no weight by more than this
# fraction of a step (bf16 rounding of on-grid weights stays far below it; weights that
# are not 4-bit move by up to half a step).
GRID_TOLERANCE = 0.1
PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Group sizes _weight_int4pack_mm_for_cpu accepts (torch 2.11 through 2.13).
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


def packable(weight: torch.Tensor) -> bool:
    """The int4 kernel's shape rules: K in whole groups, N a multiple of 16."""
    out_features, in_features = weight.shape
    return (
        in_features % GROUP_SIZE == 0 and out_features % 16 == 0 and weight.dtype in PACKABLE_DTYPES
    )


def pack_int4(weight: torch.Tensor, grid_only: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(packed uint8, scales_and_zeros [K/32, N, 2])`` for an ``[N, K]`` weight, or None
    when it cannot be packed (or, with ``grid_only``, is not already on a 4-bit grid)."""
    out_features, in_features = weight.shape
    if not packable(weight):
        return None
    w = weight.float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = (high - low) / 15
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((w - low[..., None]) / step[..., None]).round_().clamp_(0, 15)
    if grid_only:
        moved = (q * scale[..., None] + low[..., None] - w).abs().amax(dim=-1)
        if bool((moved > GRID_TOLERANCE * step).any()):
            return None
    zero = low + 8 * scale
    q_int = q.view(out_features, in_features).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_int, 1)
    scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(weight.dtype).contiguous()
    return packed, scales_zeros


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int = GROUP_SIZE,
) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != scales_zeros.dtype:
        rows = rows.to(scales_zeros.dtype)
    out = INT4_MM(rows.contiguous(), packed, group_size, scales_zeros)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out + bias if bias is not None else out


def kernel_group_size(group_of_input: torch.Tensor) -> int | None:
    """The largest group size the kernel takes (256, 128, 64 or 32) whose every group of
    consecutive inputs lies in one group of ``group_of_input`` (the quantization group of
    each input, in the kernel's input order), or None."""
    in_features = group_of_input.numel()
    for size in KERNEL_GROUP_SIZES:
        if in_features % size == 0:
            blocks = group_of_input.view(-1, size)
            if bool((blocks == blocks[:, :1]).all()):
                return size
    return None


def pack_quantized_groups(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_of_input: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Already-quantized 4-bit weights ``w[n, k] = (q[k, n] - z[g, n]) * s[g, n]``, ``g =
    group_of_input[k]`` (``q [K, N]``, ``zeros``/``scales [groups, N]``), packed for the
    kernel with no rounding of ``q``: ``(packed, scales_and_zeros, group size)``, or None
    where the shape or the groups do not fit the kernel. The kernel's zero is ``(8 - z) s``
    so that ``(q - 8) s + (8 - z) s = (q - z) s``."""
    out_features = q.shape[1]
    size = kernel_group_size(group_of_input)
    if size is None or out_features % 16 or dtype not in PACKABLE_DTYPES:
        return None
    source = group_of_input[::size].long()
    group_scales = scales[source].float()
    group_zeros = (8 - zeros[source].float()) * group_scales
    scales_zeros = torch.stack((group_scales, group_zeros), dim=-1).to(dtype).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.t().to(torch.int32).contiguous(), 1
    )
    return packed, scales_zeros, size


def pack_int8_groups(
    weight: torch.Tensor, grid_only: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An ``[N, K]`` weight as 8-bit integers with a scale per group of 32 (GGUF Q8_0's
    layout), packed for the int4 kernel as two 4-bit halves: ``q + 128 = 16 a + b`` and
    ``d q = 16 d (a - 8) + (d (b - 8) + 8 d)``, the ``a`` groups then the ``b`` groups along
    a doubled K, so one int4 matmul over ``[x | x]`` computes ``x W^T``. With
    ``grid_only`` the weight must already be on such a grid (checked on its elements
    below a quarter of the group's maximum, where the run dtype resolves the grid)."""
    out_features, in_features = weight.shape
    if not packable(weight):
        return None
    w = weight.float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    amax = w.abs().amax(dim=-1, keepdim=True)
    d = amax / 127
    step = torch.where(d > 0, d, torch.ones_like(d))
    q = (w / step).round_().clamp_(-127, 127)
    if grid_only:
        small = q.abs() < 32
        if bool(((w / step - q).abs() > 0.2).logical_and_(small).any()):
            return None
    shifted = (q + 128).to(torch.int32).view(out_features, in_features)
    high, low = shifted // 16, shifted % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat((high, low), 1), 1)
    d = d.squeeze(-1).t()  # [K/32, N]
    scales = torch.cat((16 * d, d), dim=0)
    zeros = torch.cat((torch.zeros_like(d), 8 * d), dim=0)
    scales_zeros = torch.stack((scales, zeros), dim=-1).to(weight.dtype).contiguous()
    return packed, scales_zeros


class Int8GroupLogitsMatmul:
    """The LM head with 8-bit weights per group of 32 (small batches) or its dense
    weight (large batches); see :func:`pack_int8_groups`. ``dense_copy``: the weight in a
    dtype whose GEMM beats the packed kernel past 16 rows where the weight's own does not
    (fp32 on CPUs without AVX-512), used from 17 rows."""

    def __init__(
        self,
        weight: torch.Tensor,
        packed: tuple[torch.Tensor, torch.Tensor],
        dense_copy: torch.Tensor | None = None,
    ) -> None:
        self.weight = weight  # shared with the embedding when tied: not copied
        self.packed, self.scales_zeros = packed
        # The head is never traced: where oneDNN takes it, the copy is kept blocked only.
        self.blocked = None
        if dense_copy is not None and OneDnnWeight.fits(dense_copy):
            self.blocked, dense_copy = OneDnnWeight(dense_copy), None
        self.dense_copy = dense_copy

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        blocked = self.blocked is not None and self.blocked.usable()
        if rows.shape[0] >= DENSE_FROM_ROWS and (blocked or self.dense_copy is not None):
            return dense_linear(hidden, self.dense_copy, self.blocked)
        if rows.shape[0] > PACKED_MAX_ROWS[rows.dtype]:
            return F.linear(hidden, self.weight)
        doubled = torch.cat((rows, rows), dim=1)
        return int4_matmul(doubled, self.packed, self.scales_zeros, None).view(
            *hidden.shape[:-1], -1
        )
