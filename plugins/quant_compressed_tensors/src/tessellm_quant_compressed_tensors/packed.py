"""``pack-quantized`` linears (W4A16, W8A16): int weights packed into int32, weight-only.

A checkpoint stores, for a linear of ``N`` outputs and ``K`` inputs quantized to ``b``
bits (4 or 8) in groups of ``G`` inputs (or one group per output channel):

- ``weight_packed`` int32 ``[N, K * b / 32]``: the values along K, ``32 / b`` to a word,
  the first in the lowest bits, each stored as ``q + 2**(b-1)`` (so unsigned);
- ``weight_scale`` ``[N, K / G]`` (``[N, 1]`` per channel), in the model's dtype;
- ``weight_zero_point`` int32 ``[N * b / 32, K / G]`` (asymmetric only): zero points
  packed the same way but along N; symmetric weights have zero point 0;
- ``weight_shape`` int64 ``[2]``: ``[N, K]``.

and means ``w[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``g = k // G`` (with the
unsigned values and zero points alike, since both carry the same offset).

After loading, the values are unpacked once and handed to the runtimes of the sibling
packages, keeping no dense weight:

- 4 bits: ``tessellm_quant_int4``'s group-quantized runtime (torch's int4 CPU kernel,
  the Triton dequant-GEMM/GEMV on CUDA, a per-call dequantization elsewhere);
- 8 bits per channel, symmetric: ``tessellm_quant_int8``'s weight-only int8 matmul;
- 8 bits in groups or with zero points, where that runtime has a fast kernel (torch's
  int4 CPU kernel in bf16 or on Arm, Triton on CUDA): the 4-bit runtime over a doubled
  K, each 8-bit value split into its high and low nibbles: ``s (q - z) = 16 s (q_hi -
  z_hi) + s (q_lo - z_lo)``, the input repeated for the second half. Same bytes as int8,
  exact arithmetic, twice the multiply-adds of a 4-bit layer. Elsewhere (x86 in fp32 or
  fp16, where that kernel is a scalar loop and the int4 runtime dequantizes per call) the
  int8 values are kept and dequantized per call, one layer at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.quantization import QuantizationMethod, set_weight_attrs
from tessellm_quant_int4.int4_groups import (
    QuantizedGroups,
    cpu_kernel_fast,
    install,
    int4_linear,
)
from tessellm_quant_int8 import packed_scale, weight_only_int8_linear

CHECKPOINT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def unpack_unsigned(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[..., W]`` → int32 ``[..., W * 32 / bits]``: value ``i`` of each word from
    bits ``i * bits`` upwards (compressed-tensors' ``pack_to_int32`` layout for 4 and 8
    bits), as stored (offset, unsigned)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def _row_split(layer: nn.Module) -> bool:
    """Whether the layer's inputs are split across tensor-parallel ranks."""
    from tessellm.layers.linear import RowParallelLinear

    parallel = getattr(layer, "parallel", None)
    return isinstance(layer, RowParallelLinear) and getattr(parallel, "world_size", 1) > 1


def _checkpoint_in_features(layer: nn.Module, in_features: int) -> int:
    return in_features * layer.parallel.world_size if _row_split(layer) else in_features


def check_weight_shape(layer: nn.Module, loaded: torch.Tensor, shard: int, tp_index: int) -> None:
    """``weight_shape`` says the checkpoint matrix's input features; they must be the
    layer's (a mismatch would otherwise read packed padding as weights)."""
    expected = layer.ct_checkpoint_in_features
    if loaded.numel() != 2 or int(loaded[1]) != expected:
        raise ValueError(
            f"weight_shape {loaded.tolist()} does not match a linear layer of {expected} "
            "input features"
        )
    layer.weight_shape.data.copy_(loaded.reshape(2))


class PackedWeightOnly(QuantizationMethod):
    """The layers of a ``pack-quantized`` scheme (see the module docstring); used by
    :class:`~tessellm_quant_compressed_tensors.method.CompressedTensors`."""

    name = "compressed-tensors:pack-quantized"

    def __init__(self, bits: int, group_size: int, symmetric: bool) -> None:
        if bits not in (4, 8):
            raise ValueError(f"{bits}-bit packed weights are not supported (4 or 8)")
        self.bits = bits
        self.group_size = group_size  # -1: one group per output channel
        self.symmetric = symmetric

    def _scale_columns(self, layer: nn.Module, in_features: int) -> tuple[int, int | None]:
        """(scale columns on this rank, their input_dim): per channel one column, kept
        whole; per group ``ceil(K / G)``, split with the inputs across ranks."""
        if self.group_size == -1:
            return 1, None
        if _row_split(layer) and in_features % self.group_size:
            raise ValueError(
                f"{in_features} inputs per rank are not whole groups of {self.group_size}"
            )
        return -(-in_features // self.group_size), 1

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        per_word = 32 // self.bits
        if in_features % per_word or (not self.symmetric and out_features % per_word):
            raise ValueError(
                f"{self.bits}-bit packed weights need input features (and, with zero "
                f"points, output features) in multiples of {per_word}: this layer has "
                f"{in_features} -> {out_features} per rank"
            )
        groups, group_dim = self._scale_columns(layer, in_features)
        layer.ct_dtype = dtype
        layer.ct_checkpoint_in_features = _checkpoint_in_features(layer, in_features)
        packed = torch.zeros(out_features, in_features // per_word, dtype=torch.int32)
        self._add(layer, "weight_packed", packed, output_dim=0, input_dim=1)
        # float32 holds the checkpoint's bf16/fp16/fp32 scales exactly.
        scale = torch.zeros(out_features, groups, dtype=torch.float32)
        self._add(layer, "weight_scale", scale, output_dim=0, input_dim=group_dim)
        if not self.symmetric:
            zeros = torch.zeros(out_features // per_word, groups, dtype=torch.int32)
            self._add(layer, "weight_zero_point", zeros, output_dim=0, input_dim=group_dim)
        shape = torch.zeros(2, dtype=torch.int64)
        self._add(layer, "weight_shape", shape, output_dim=None, input_dim=None)
        layer.weight_shape.load_shard = check_weight_shape

    @staticmethod
    def _add(layer: nn.Module, name: str, tensor: torch.Tensor, **dims: int | None) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        set_weight_attrs(param, **dims)
        layer.register_parameter(name, param)

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q [N, K], zeros [N, groups], scales [N, groups])``, values and zero points
        unsigned (offset by ``2**(bits-1)``), from the loaded checkpoint tensors."""
        q = unpack_unsigned(layer.weight_packed.data, self.bits)
        scales = layer.weight_scale.data.float()
        if self.symmetric:
            zeros = torch.full(scales.shape, 1 << (self.bits - 1), dtype=torch.int32)
            zeros = zeros.to(q.device)
        else:  # packed along N: unpack the transpose, whose words run along its last dim
            zeros = unpack_unsigned(layer.weight_zero_point.data.t().contiguous(), self.bits)
            zeros = zeros.t()[: q.shape[0]].contiguous()
        return q, zeros, scales

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, zeros, scales = self.unpacked(layer)
        for name in CHECKPOINT_TENSORS:
            if name in layer._parameters:
                delattr(layer, name)
        in_features = q.shape[1]
        span = in_features if self.group_size == -1 else self.group_size
        group_of_input = torch.arange(in_features, device=q.device) // span
        if self.bits == 4:
            groups = _runtime_groups(q, zeros, scales, group_of_input)
            install(layer, groups, layer.ct_dtype)
            layer.ct_path = "int4"
        elif self.group_size == -1 and self.symmetric:
            layer.register_buffer("ct_int8_weight", (q - 128).to(torch.int8), persistent=False)
            layer.register_buffer("ct_int8_scale", scales.reshape(-1, 1), persistent=False)
            # Kept on the layer: computed inside a compiled CPU step, inductor cannot lower
            # the packed int8 kernel's scale argument.
            scale_bf16 = packed_scale(layer.ct_int8_scale)
            layer.register_buffer("ct_int8_scale_bf16", scale_bf16, persistent=False)
            layer.ct_path = "int8"
        elif q.device.type == "cuda" or cpu_kernel_fast(layer.ct_dtype):
            install(layer, _as_nibble_halves(q, zeros, scales, group_of_input), layer.ct_dtype)
            layer.ct_path = "int8_halves"
        else:
            zero_scales = (-(zeros - 128).float() * scales).contiguous()
            layer.register_buffer("ct_int8_weight", (q - 128).to(torch.int8), persistent=False)
            layer.register_buffer("ct_int8_scales", scales, persistent=False)
            layer.register_buffer("ct_int8_zero_scales", zero_scales, persistent=False)
            layer.ct_group_size = span
            layer.ct_path = "int8_dequantize"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        path = layer.ct_path
        if path == "int4":
            return int4_linear(layer, x, bias)
        if path == "int8":
            return weight_only_int8_linear(
                x,
                layer.ct_int8_weight,
                layer.ct_int8_scale,
                bias,
                scale_bf16=layer.ct_int8_scale_bf16,
            )
        if path == "int8_halves":
            return int4_linear(layer, torch.cat((x, x), dim=-1), bias)
        weight = dequantize_int8_groups(
            layer.ct_int8_weight,
            layer.ct_int8_scales,
            layer.ct_int8_zero_scales,
            layer.ct_group_size,
        )
        return F.linear(x, weight.to(x.dtype), bias)


def dequantize_int8_groups(
    q: torch.Tensor, scales: torch.Tensor, zero_scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``q * s - z * s`` per group of ``group_size`` inputs as a float32 ``[N, K]`` weight
    (``q`` int8 ``[N, K]``; ``scales``, ``zero_scales = -z * s`` ``[N, groups]``; the last
    group may be partial)."""
    out_features, in_features = q.shape
    groups = scales.shape[1]
    values = q.float()
    if groups * group_size != in_features:
        values = F.pad(values, (0, groups * group_size - in_features))
    grouped = values.view(out_features, groups, group_size)
    weight = torch.addcmul(zero_scales[..., None], grouped, scales[..., None])
    return weight.reshape(out_features, -1)[:, :in_features]


def _as_nibble_halves(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_of_input: torch.Tensor
) -> QuantizedGroups:
    """8-bit ``(q - z) * s`` as 4-bit groups over ``2K`` inputs: the high nibbles with
    scale ``16 s`` in groups ``g``, then the low nibbles with scale ``s`` in groups
    ``g + groups`` (see the module docstring)."""
    groups = scales.shape[1]
    q4 = torch.cat((q >> 4, q & 0xF), dim=1)
    zeros4 = torch.cat((zeros >> 4, zeros & 0xF), dim=1)
    scales4 = torch.cat((scales * 16, scales), dim=1)
    halves = torch.cat((group_of_input, group_of_input + groups))
    return _runtime_groups(q4, zeros4, scales4, halves)


def _runtime_groups(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_of_input: torch.Tensor
) -> QuantizedGroups:
    """The int4 runtime's layout, ``[K, N]`` and ``[groups, N]``, row-major (the Triton
    kernels index them as such)."""
    return QuantizedGroups(
        q.t().contiguous(), zeros.t().contiguous(), scales.t().contiguous(), group_of_input
    )
