"""Quantization methods: how a linear layer stores, loads and multiplies its weights.

A method is chosen per model: by the checkpoint (its ``quantization_config.quant_method``
names a format that a registered method declares it reads, in
``capabilities.checkpoint_formats``), else by the user (``quantization=``), else by the
platform's default. It is built with :meth:`QuantizationMethod.from_config` from the
checkpoint's ``quantization_config`` (a dict, or None), and refused with the reasons of
:meth:`~QuantizationMethod.validate` where it cannot run.

**Loading.** ``create_weights`` registers the layer's parameters in their stored form
(``qweight``, ``scales``, ``weight_scale`` ...), named as the checkpoint names them after
the layer's prefix. The parallel linear layers' ``weight_loader`` place each checkpoint
tensor by the parameter's attributes (set with :func:`set_weight_attrs`):

- ``output_dim``: the dimension that runs along the output features (default 0; None:
  the parameter does not split by output, e.g. a per-tensor scale or ``g_idx``). Packed
  or grouped storage is fine: an offset in output features is scaled by the parameter's
  size along this dimension over the layer's output features.
- ``input_dim``: likewise along the input features (default 1 for 2-D parameters, none
  for 1-D); row-parallel layers split it.
- ``shard_indexed``: the parameter holds one entry per fused output shard (q, k, v; or
  gate, up), e.g. a per-tensor scale of each checkpoint matrix that one fused layer
  holds; its shape is ``[len(layer.output_shard_sizes)]``.

- ``load_shard``: a callable ``(layer, loaded, shard_index, tp_index)`` that stores the
  checkpoint tensor itself, for storage whose shape is known only from the tensor (GGUF
  blocks whose quantization type varies per matrix); it replaces the placement above.

A layer exposes ``output_shard_sizes`` (this rank's output features of each fused
checkpoint matrix, in order) before ``create_weights`` is called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class QuantCapabilities:
    """What a method can run, as data (shown by ``tessellm plugins`` and checked by
    :meth:`QuantizationMethod.validate`).

    ``device_types``: torch device types it runs on. ``min_cuda_capability``: the lowest
    CUDA compute capability, ``(major, minor)``, where it runs on ``cuda`` (None: any).
    ``dtypes``: activation/run dtypes. ``checkpoint_formats``: the checkpoint
    ``quant_method`` values it loads (empty: it quantizes dense checkpoints itself).
    ``bits`` and ``group_sizes``: weight bit widths and quantization groups it handles
    (``-1``: one group per output channel), for the reader; a method checks a
    checkpoint's own values in ``from_config``.
    """

    device_types: tuple[str, ...] = ("cpu", "cuda")
    min_cuda_capability: tuple[int, int] | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    checkpoint_formats: tuple[str, ...] = ()
    bits: tuple[int, ...] = ()
    group_sizes: tuple[int, ...] = ()
    row_error: float = 0.0
    dense_checkpoints: bool | None = None
    preferred_dtypes: tuple[torch.dtype, ...] | None = None

    @property
    def loads_dense(self) -> bool:
        if self.dense_checkpoints is not None:
            return self.dense_checkpoints
        return not self.checkpoint_formats

    def describe(self) -> str:
        dtypes = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
        parts = [f"devices {'/'.join(self.device_types)}", f"dtypes {dtypes}"]
        if self.min_cuda_capability is not None:
            parts.append("CUDA capability >= {}.{}".format(*self.min_cuda_capability))
        if self.checkpoint_formats:
            parts.append(f"reads {', '.join(self.checkpoint_formats)} checkpoints")
        if self.bits:
            parts.append(f"{'/'.join(map(str, self.bits))}-bit")
        if self.group_sizes:
            parts.append(f"groups {'/'.join(map(str, self.group_sizes))}")
        return "; ".join(parts)


class QuantizationMethod(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[QuantCapabilities] = QuantCapabilities()

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> QuantizationMethod:
        """Build the method for a checkpoint's ``quantization_config`` (None for a dense
        checkpoint, or when a test builds the method: then the format's common defaults,
        e.g. 4 bits in groups of 128). Raise ``ValueError`` naming what is unsupported
        (bits, group size, scheme) so the load fails with that reason."""
        return cls()

    def validate(
        self,
        device_type: str,
        dtype: torch.dtype,
        cuda_capability: tuple[int, int] | None = None,
    ) -> list[str]:
        """Reasons this method cannot run on ``device_type`` in ``dtype`` (empty: it can).
        The default reads :attr:`capabilities`."""
        caps = self.capabilities
        reasons = []
        if device_type not in caps.device_types:
            reasons.append(f"runs on {'/'.join(caps.device_types)}, not {device_type}")
        if dtype not in caps.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes)
            reasons.append(f"runs in {allowed}, not {str(dtype).removeprefix('torch.')}")
        needed = caps.min_cuda_capability
        if device_type == "cuda" and needed and cuda_capability and cuda_capability < needed:
            reasons.append(
                "needs CUDA compute capability {}.{}".format(*needed)
                + " or newer, this GPU has {}.{}".format(*cuda_capability)
            )
        return reasons

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        """Register the layer's parameters (``in_features``/``out_features`` per rank)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` in whatever form the weights are kept."""

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a checkpoint of this method stores for the dense ``[out, in]`` ``weight``,
        by parameter name relative to the layer (``{"weight": weight}`` for a method that
        loads dense weights). The reference quantizer of the format: tests and
        ``check_quantization_method`` build checkpoints with it."""
        return {"weight": weight}

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027
        """Repack weights once all are loaded (optional)."""

    def process_model_after_loading(self, model: nn.Module) -> None:  # noqa: B027
        """Once per model after every layer's weights are processed: repack what is not a
        linear layer of this method (e.g. set ``ParallelLMHead.logits_matmul``). Optional."""


def set_weight_attrs(
    param: torch.Tensor,
    *,
    output_dim: int | None = 0,
    input_dim: int | None = None,
    shard_indexed: bool = False,
) -> torch.Tensor:
    """Tell the linear layers' loaders how ``param`` splits (see the module docstring)."""
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.shard_indexed = shard_indexed  # type: ignore[attr-defined]
    return param


def output_dim_of(param: torch.Tensor) -> int | None:
    return getattr(param, "output_dim", 0)


def input_dim_of(param: torch.Tensor) -> int | None:
    return getattr(param, "input_dim", 1 if param.dim() == 2 else None)


class Unquantized(QuantizationMethod):
    """Plain dense weights in the run dtype."""

    name = "none"
    # nn.functional.linear runs wherever torch does (XLA included).
    capabilities: ClassVar[QuantCapabilities] = QuantCapabilities(
        device_types=("cpu", "cuda", "xla")
    )

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.linear(x, layer.weight, bias)
