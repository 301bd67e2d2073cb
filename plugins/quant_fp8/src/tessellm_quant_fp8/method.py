"""The ``fp8`` quantization method: W8A8 float8_e4m3fn with per-output-channel weight scales.

Two ways in:

- **fp8 checkpoints** (``quantization_config.quant_method == "fp8"``, as vLLM, AutoFP8
  and llm-compressor's fp8 export write them): each linear stores ``weight``
  (float8_e4m3fn ``[N, K]``), ``weight_scale`` (float32, per tensor ``[]``/``[1]`` or per
  channel ``[N, 1]``) and, with ``activation_scheme: "static"``, ``input_scale``
  (float32, per tensor).
- **online** (a dense checkpoint with ``quantization="fp8"``): dense weights load in the
  run dtype and are quantized per output channel once loaded; the dense copy is dropped.

Fused layers (q/k/v, gate/up) load one checkpoint matrix per shard, each with its own
per-tensor scale. They are kept as per-output-channel scales, each shard's scale repeated
over its channels, rather than requantized to one shared scale as vLLM does: requantizing
``q * s_i / max(s)`` rounds every shard with a smaller scale a second time (up to half an
fp8 step of error per weight, on a 3-bit mantissa), while the GPU path needs row-wise
weight scales anyway (``_scaled_mm`` pairs per-token activation scales only with row-wise
weight scales), so the repeated scales cost nothing but ``N`` floats per layer.

Where it runs: CUDA with compute capability >= 8.9 through ``torch._scaled_mm`` (see
:mod:`tessellm_quant_fp8.fp8`), one row at a time (batch-1 decode) through the Triton
weight-only GEMV of :mod:`tessellm_quant_fp8.fp8_gemv`; elsewhere (CPU, ROCm, older
GPUs) the weight-only reference path, which keeps the weights in fp8 and casts them per
call.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.interfaces.quantization import (
    QuantCapabilities,
    QuantizationMethod,
    set_weight_attrs,
)
from tessellm_quant_fp8.fp8 import (
    FP8_DTYPE,
    emulated_linear,
    pad_for_scaled_mm,
    quantize_weight_per_channel,
    reference_linear,
    scaled_mm_linear,
    scaled_mm_out_dtype,
)

ACTIVATION_SCHEMES = ("dynamic", "static")
KERNELS = ("auto", "scaled_mm", "emulate", "reference")
# Modules tessellm never quantizes, so a checkpoint may list them as left dense.
ALWAYS_DENSE = ("lm_head", "embed_tokens")
MIN_CUDA_CAPABILITY = (8, 9)


def _shard_index_of(shard: Any) -> int:
    """A fused layer's shard id as the linear layers pass it (``"q"``/``"k"``/``"v"`` or
    an int) as an index into ``layer.output_shard_sizes``."""
    return "qkv".index(shard) if isinstance(shard, str) else int(shard)


def load_weight_scale(layer: nn.Module, loaded: torch.Tensor, shard: int, tp_index: int) -> None:
    """Store one checkpoint matrix's ``weight_scale`` into the layer's per-channel scales:
    a per-tensor scale (one element) fills the shard's channels; a per-channel scale
    ``[N_ckpt, 1]`` gives this rank's slice (the whole, for a row-parallel layer, whose
    outputs are not split)."""
    param = layer.weight_scale
    sizes = layer.output_shard_sizes
    offset, size = sum(sizes[:shard]), sizes[shard]
    target = param.data[offset : offset + size]
    if loaded.numel() == 1:  # broadcast without reading the value back (no device sync)
        target.copy_(loaded.reshape(1, 1))
        return
    rows = loaded.reshape(-1, 1)
    if rows.shape[0] != size:  # column-parallel: this rank's part of the checkpoint matrix
        rows = rows.narrow(0, tp_index * size, size)
    target.copy_(rows)


class Fp8Method(QuantizationMethod):
    """fp8 W8A8 (see the module docstring). ``checkpoint``: the layers load fp8 tensors
    (else dense ones, quantized after loading); ``activation_scheme``: ``"static"`` loads
    an ``input_scale`` per matrix; ``kernel``: ``"auto"`` (``_scaled_mm`` where it runs,
    else the reference), or forced: ``"scaled_mm"``, ``"emulate"`` (W8A8 rounding in
    float32, as a check of the GPU's numbers on any device; where ``_scaled_mm`` runs, its
    output rounded to the dtype ``_scaled_mm`` writes there), ``"reference"``."""

    name = "fp8"
    capabilities = QuantCapabilities(
        device_types=("cpu", "cuda"),
        min_cuda_capability=MIN_CUDA_CAPABILITY,
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        checkpoint_formats=("fp8",),
        dense_checkpoints=True,  # quantized online (quantization="fp8")
        bits=(8,),
        group_sizes=(-1,),
        # A row's relative error against the dense weights, beyond the kit's own: e4m3
        # keeps 3 mantissa bits (up to 1/16 of a weight). On the kit's 4-bit grid weights
        # (whose values 3*56, 21 ... fall between e4m3 steps) the worst row measured 6.2%
        # weight-only and 8.6% with activations rounded too (median 3.4% / 4.7%).
        row_error=0.08,
    )
    # What ``kernel="auto"`` resolves to off CUDA; tests set "emulate" to run the engine
    # with the GPU's activation rounding on the CPU.
    default_off_gpu_kernel: ClassVar[str] = "reference"

    def __init__(
        self, checkpoint: bool = False, activation_scheme: str = "dynamic", kernel: str = "auto"
    ) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"activation_scheme {activation_scheme!r} is not supported "
                f"(supported: {', '.join(ACTIVATION_SCHEMES)})"
            )
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")
        if activation_scheme == "static" and not checkpoint:
            raise ValueError("static activation scales come only from an fp8 checkpoint")
        self.checkpoint = checkpoint
        self.activation_scheme = activation_scheme
        self.kernel = kernel

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> Fp8Method:
        """None: online quantization of a dense checkpoint. Otherwise HF's/vLLM's fp8
        config: ``activation_scheme`` (``dynamic`` default, ``static``); refused with a
        ValueError: another ``quant_method``, ``weight_block_size`` (block-wise fp8), an
        e5m2 ``fmt``, ``ignored_layers``/``modules_to_not_convert`` naming layers tessellm
        would quantize (a layer does not know its name when it is created)."""
        if quant_config is None:
            return cls()
        method = str(quant_config.get("quant_method", "fp8")).lower()
        if method != "fp8":
            raise ValueError(f"reads quant_method 'fp8' checkpoints, not {method!r}")
        block = quant_config.get("weight_block_size")
        if block:
            raise ValueError(
                f"block-wise scales (weight_block_size {list(block)}) are not supported; "
                "tessellm-quant-fp8 reads per-tensor and per-channel fp8 checkpoints"
            )
        fmt = str(quant_config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"fmt {fmt!r} is not supported (float8_e4m3fn only)")
        left_dense = [
            name
            for key in ("ignored_layers", "modules_to_not_convert")
            for name in quant_config.get(key) or ()
            if not any(part in name for part in ALWAYS_DENSE)
        ]
        if left_dense:
            shown = ", ".join(left_dense[:4]) + (" ..." if len(left_dense) > 4 else "")
            raise ValueError(
                f"checkpoints with unquantized linear layers are not supported ({shown})"
            )
        scheme = str(quant_config.get("activation_scheme", "dynamic")).lower()
        return cls(checkpoint=True, activation_scheme=scheme)

    # -- loading ---------------------------------------------------------------------------
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.fp8_dtype = dtype  # the run dtype, for the output of _scaled_mm
        if not self.checkpoint:  # dense weights, quantized once loaded
            layer.weight = nn.Parameter(
                torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
            )
            return
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        # Per output channel whatever the checkpoint holds (see the module docstring). NaN
        # until loaded, so a shard the checkpoint lacks is caught after loading.
        scale = torch.full((out_features, 1), float("nan"), dtype=torch.float32)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        set_weight_attrs(layer.weight_scale, output_dim=0, input_dim=None)
        layer.weight_scale.load_shard = load_weight_scale
        if self.activation_scheme == "static":
            shards = len(layer.output_shard_sizes)
            input_scale = torch.full((shards,), float("nan"), dtype=torch.float32)
            layer.input_scale = nn.Parameter(input_scale, requires_grad=False)
            set_weight_attrs(layer.input_scale, output_dim=None, shard_indexed=True)

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """An fp8 checkpoint's tensors for one linear: ``weight`` float8_e4m3fn and a
        per-channel ``weight_scale [N, 1]`` (with ``activation_scheme: "static"``, also an
        ``input_scale`` of 1: the reference quantizer cannot know the activations). The
        online method (``from_config(None)``) loads a dense checkpoint: ``{"weight":
        weight}``."""
        if not self.checkpoint:
            return {"weight": weight}
        q, scale = quantize_weight_per_channel(weight)
        tensors = {"weight": q, "weight_scale": scale}
        if self.activation_scheme == "static":
            tensors["input_scale"] = torch.ones((), dtype=torch.float32)
        return tensors

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.checkpoint:
            q, scale = layer.weight.data, layer.weight_scale.data.reshape(-1)
            _check_loaded(layer, scale, "weight_scale")
        else:
            q, scale = quantize_weight_per_channel(layer.weight.data)
            scale = scale.reshape(-1)
        input_scale = None
        if self.activation_scheme == "static":
            _check_loaded(layer, layer.input_scale.data, "input_scale")
            # One activation feeds every fused shard: the largest scale clips none of them.
            input_scale = layer.input_scale.data.max()
        layer.fp8_in_features, layer.fp8_out_features = q.shape[1], q.shape[0]
        layer.fp8_kernel = self._kernel_for(q.device)
        layer.fp8_out_dtype = None
        # One row (batch-1 decode) goes through fp8_gemv where _scaled_mm runs on its own.
        layer.fp8_gemv = (
            self.kernel == "auto" and layer.fp8_kernel == "scaled_mm" and _gemv_installed()
        )
        if layer.fp8_kernel == "scaled_mm":
            q, scale = pad_for_scaled_mm(q, scale)
            layer.fp8_out_dtype = scaled_mm_out_dtype(q.device, layer.fp8_dtype)
        elif layer.fp8_kernel == "emulate" and _scaled_mm_runs_on(q.device):
            # The GPU's numbers, output rounding included: where _scaled_mm writes bf16
            # for a float32 model, the next layer's fp8 rounding of a bf16-rounded input
            # lands a whole fp8 step away from that of the float32 value for ~2% of the
            # activations, which sets the two apart far more than the bf16 rounding does.
            layer.fp8_out_dtype = scaled_mm_out_dtype(q.device, layer.fp8_dtype)
        # Replacing the parameters drops the dense (online) or NaN-initialised originals.
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        if input_scale is not None:
            layer.input_scale = nn.Parameter(input_scale.float(), requires_grad=False)

    def _kernel_for(self, device: torch.device) -> str:
        if self.kernel != "auto":
            return self.kernel
        return "scaled_mm" if _scaled_mm_runs_on(device) else self.default_off_gpu_kernel

    # -- the matmul ------------------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        kernel = layer.fp8_kernel
        input_scale = getattr(layer, "input_scale", None)
        if kernel == "scaled_mm" and x2.shape[0] == 1 and layer.fp8_gemv:
            from tessellm_quant_fp8.fp8_gemv import fp8_gemv  # Triton: CUDA only

            y = fp8_gemv(x2, layer.weight, layer.weight_scale, layer.fp8_out_features, bias)
        elif kernel == "scaled_mm":
            y = scaled_mm_linear(
                x2,
                layer.weight,
                layer.weight_scale,
                layer.fp8_out_features,
                bias,
                input_scale,
                layer.fp8_out_dtype,
            )
        elif kernel == "emulate":
            y = emulated_linear(
                x2, layer.weight, layer.weight_scale, bias, input_scale, layer.fp8_out_dtype
            )
        else:
            y = reference_linear(x2, layer.weight, layer.weight_scale, bias)
        return y.reshape(*lead, y.shape[-1])


def _scaled_mm_runs_on(device: torch.device) -> bool:
    """Whether ``kernel="auto"`` takes ``_scaled_mm`` on ``device``: CUDA (not ROCm, whose
    fp8 is e4m3fnuz on MI300) of compute capability >= 8.9."""
    return (
        device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
    )


def _gemv_installed() -> bool:
    """Whether the ``[cuda]`` extra's kernel library is there (else one row takes
    ``_scaled_mm`` too)."""
    return importlib.util.find_spec("tessellm_triton_kernels") is not None


def _check_loaded(layer: nn.Module, values: torch.Tensor, name: str) -> None:
    """Every shard's scale was loaded (the engine checks parameter names only)."""
    missing = torch.isnan(values.reshape(-1))
    if bool(missing.any()):
        raise ValueError(
            f"fp8: {name} of {type(layer).__name__} is missing for "
            f"{int(missing.sum())} of {missing.numel()} entries (a fused shard the checkpoint "
            "lacks, or a NaN scale)"
        )
