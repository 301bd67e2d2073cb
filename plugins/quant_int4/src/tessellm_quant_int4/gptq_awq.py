"""``gptq`` and ``awq``: 4-bit checkpoints as AutoGPTQ/GPTQModel and AutoAWQ write them.

The layer's parameters are the checkpoint's tensors in their stored layouts (see
:mod:`tessellm_quant_int4.formats`), split across tensor-parallel ranks and fused q/k/v
or gate/up shards by the linear layers' loaders from their declared dims. After loading
they are unpacked once and repacked for where the layer runs
(:mod:`tessellm_quant_int4.int4_groups`): torch's int4 CPU kernel, the Triton kernels on
CUDA, else a dequantize-per-call reference. The checkpoint tensors are then dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessellm.interfaces.quantization import (
    QuantCapabilities,
    QuantizationMethod,
    set_weight_attrs,
)
from tessellm_quant_int4.formats import (
    AWQ_ORDER,
    awq_tensors,
    gptq_tensors,
    gptq_zeros,
    num_groups,
    unpack_along_cols,
    unpack_along_rows,
)
from tessellm_quant_int4.int4_groups import QuantizedGroups, install, int4_linear

GROUP_SIZES = (32, 64, 128)
RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHECKPOINT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
RUNS_WHERE = (
    "CPU: torch's int4 kernel (_weight_int4pack_mm_for_cpu) where N % 16 == 0 and K % 32 == 0",
    "CUDA: Triton dequant-GEMM, one-row GEMV",
    "elsewhere: dequantize per call",
)


def _option(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _check_bits(config: dict[str, Any]) -> None:
    bits = _option(config, "bits", "w_bit", default=4)
    if int(bits) != 4:
        raise ValueError(f"{bits}-bit weights are not supported (4-bit only)")


def _add_param(layer: nn.Module, name: str, tensor: torch.Tensor, **dims: int | None) -> None:
    param = nn.Parameter(tensor, requires_grad=False)
    set_weight_attrs(param, **dims)
    layer.register_parameter(name, param)


def _row_split(layer: nn.Module) -> bool:
    """Whether the layer's inputs are split across tensor-parallel ranks."""
    from tessellm.layers.linear import RowParallelLinear

    parallel = getattr(layer, "parallel", None)
    return isinstance(layer, RowParallelLinear) and getattr(parallel, "world_size", 1) > 1


def _check_shape(in_features: int, out_features: int) -> None:
    if in_features % 8 or out_features % 8:
        raise ValueError(
            f"a 4-bit packed linear needs input and output features in multiples of 8, "
            f"this one has {in_features} -> {out_features} (per rank)"
        )


class _Int4GroupMethod(QuantizationMethod):
    """Shared loading and running of GPTQ and AWQ; the formats differ in layout only."""

    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size

    def _groups_layout(self, layer: nn.Module, in_features: int) -> tuple[int, int | None]:
        """(rows of scales/qzeros, their input_dim) on this rank: the rank's own groups
        split along with the inputs, or all groups kept whole where a rank's inputs do
        not map to its own groups (act-order, one group over all inputs)."""
        if not _row_split(layer):
            return num_groups(in_features, self._group_span(in_features)), 0
        whole = in_features * layer.parallel.world_size
        if self.group_size == -1 or getattr(self, "desc_act", False):
            return num_groups(whole, self._group_span(whole)), None
        if in_features % self.group_size:
            raise ValueError(
                f"{in_features} inputs per rank are not whole groups of {self.group_size}"
            )
        return in_features // self.group_size, 0

    def _group_span(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(layer, x, bias)

    def unpack(self, layer: nn.Module) -> QuantizedGroups:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        groups = self.unpack(layer)
        for name in CHECKPOINT_TENSORS:
            if name in layer._parameters:
                delattr(layer, name)
        install(layer, groups, layer.int4_dtype)


class GPTQ(_Int4GroupMethod):
    """GPTQ checkpoints (``quant_method: gptq``), 4-bit, symmetric or not, act-order."""

    name = "gptq"
    capabilities = QuantCapabilities(
        device_types=("cpu", "cuda"),
        dtypes=RUN_DTYPES,
        checkpoint_formats=("gptq",),
        bits=(4,),
        group_sizes=(*GROUP_SIZES, -1),
    )

    def __init__(
        self, group_size: int = 128, sym: bool = True, desc_act: bool = False, v2: bool = False
    ) -> None:
        super().__init__(group_size)
        self.sym = sym
        self.desc_act = desc_act
        self.v2 = v2  # GPTQModel's gptq_v2 zero points (stored without the -1)

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> GPTQ:
        config = quant_config or {}
        _check_bits(config)
        group_size = int(_option(config, "group_size", default=128))
        if group_size not in (*GROUP_SIZES, -1):
            raise ValueError(
                f"group_size {group_size} is not supported (32, 64, 128 or -1 for all inputs)"
            )
        fmt = str(_option(config, "checkpoint_format", default="gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        if config.get("lm_head"):
            raise ValueError("a quantized lm_head is not supported")
        if config.get("dynamic"):
            raise ValueError("per-module overrides ('dynamic') are not supported")
        return cls(
            group_size=group_size,
            sym=bool(_option(config, "sym", default=True)),
            desc_act=bool(_option(config, "desc_act", default=False)),
            v2=fmt == "gptq_v2",
        )

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        _check_shape(in_features, out_features)
        groups, group_dim = self._groups_layout(layer, in_features)
        layer.int4_dtype = dtype
        k, n = in_features, out_features
        _add_param(
            layer, "qweight", torch.zeros(k // 8, n, dtype=torch.int32), output_dim=1, input_dim=0
        )
        _add_param(
            layer,
            "qzeros",
            torch.zeros(groups, n // 8, dtype=torch.int32),
            output_dim=1,
            input_dim=group_dim,
        )
        _add_param(layer, "scales", torch.zeros(groups, n), output_dim=1, input_dim=group_dim)
        # Fp32 scales hold fp16 and bf16 checkpoints' exactly. g_idx defaults to the
        # plain grouping (only act-order reads it).
        g_idx = (torch.arange(k) // self._group_span(k)).to(torch.int32)
        _add_param(layer, "g_idx", g_idx, output_dim=None, input_dim=0)

    def unpack(self, layer: nn.Module) -> QuantizedGroups:
        q = unpack_along_rows(layer.qweight.data)
        zeros = gptq_zeros(layer.qzeros.data, self.v2)
        in_features = q.shape[0]
        if self.desc_act:
            g_idx = layer.g_idx.data.long()
        else:  # the checkpoint's g_idx is k // G then; it is ignored (TP ranks' would be offset)
            g_idx = torch.arange(in_features, device=q.device) // self._group_span(in_features)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= zeros.shape[0]:
            raise ValueError(f"g_idx names groups outside 0..{zeros.shape[0] - 1}")
        return QuantizedGroups.grouped(q, zeros, layer.scales.data, g_idx)

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return gptq_tensors(weight, self.group_size, self.sym, self.desc_act, self.v2)


class AWQ(_Int4GroupMethod):
    """AutoAWQ GEMM checkpoints (``quant_method: awq``), 4-bit with zero points."""

    name = "awq"
    capabilities = QuantCapabilities(
        device_types=("cpu", "cuda"),
        dtypes=RUN_DTYPES,
        checkpoint_formats=("awq",),
        bits=(4,),
        group_sizes=GROUP_SIZES,
    )

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> AWQ:
        config = quant_config or {}
        _check_bits(config)
        group_size = int(_option(config, "group_size", "q_group_size", default=128))
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {group_size} is not supported (32, 64 or 128)")
        if not _option(config, "zero_point", default=True):
            raise ValueError("zero_point false is not supported (AutoAWQ GEMM has zero points)")
        version = str(_option(config, "version", default="gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm)")
        if config.get("modules_to_not_convert"):
            raise ValueError("modules_to_not_convert (unquantized layers) is not supported")
        return cls(group_size=group_size)

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        _check_shape(in_features, out_features)
        groups, group_dim = self._groups_layout(layer, in_features)
        layer.int4_dtype = dtype
        k, n = in_features, out_features
        _add_param(
            layer, "qweight", torch.zeros(k, n // 8, dtype=torch.int32), output_dim=1, input_dim=0
        )
        _add_param(
            layer,
            "qzeros",
            torch.zeros(groups, n // 8, dtype=torch.int32),
            output_dim=1,
            input_dim=group_dim,
        )
        _add_param(layer, "scales", torch.zeros(groups, n), output_dim=1, input_dim=group_dim)

    def unpack(self, layer: nn.Module) -> QuantizedGroups:
        q = unpack_along_cols(layer.qweight.data, AWQ_ORDER)
        zeros = unpack_along_cols(layer.qzeros.data, AWQ_ORDER)
        groups = torch.arange(q.shape[0], device=q.device) // self.group_size
        return QuantizedGroups.grouped(q, zeros, layer.scales.data, groups)

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return awq_tensors(weight, self.group_size)
