"""The ``gguf`` quantization method: a GGUF file's quantized matrices stay quantized.

The GGUF format marks its configs ``quantization_config = {"quant_method": "gguf"}``, so
the engine picks this method for GGUF files; the format then yields, for each linear
weight, ``<prefix>.qweight_type`` (the ``GGMLQuantizationType``) and ``<prefix>.qweight``
(the rows of raw blocks, ``[rows, bytes per row]`` uint8; rows of an unquantized type
are their F32/F16/BF16 bytes). Fused layers (q/k/v, gate/up) receive one of each per
checkpoint matrix, and the matrices' types may differ (Q4_K_M mixes Q4_K and Q6_K).
After loading, each matrix is decoded (``blocks.py``) and the layer's matrices are
repacked into the runtime form of its device (``runtime.py``, ``triton_matmul.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessellm.errors import ConfigError
from tessellm.interfaces.quantization import (
    QuantCapabilities,
    QuantizationMethod,
    set_weight_attrs,
)
from tessellm_gguf.blocks import DENSE_TYPES, QT, bytes_per_row, decode, dense_rows
from tessellm_gguf.runtime import (
    INT4_KERNEL_DTYPES,
    DenseCopyBudget,
    GGUFLinearRuntime,
    add_onednn_copies,
    dense_copy_dtype,
)

# What ``checkpoint_tensors`` writes: llama.cpp's near-lossless 8-bit type.
REFERENCE_TYPE = QT.Q8_0


def _store_shard(layer: nn.Module, loaded: torch.Tensor, shard_index: int, _tp: int) -> None:
    """``qweight``'s loader: keep each checkpoint matrix's bytes until all have arrived
    (their types, in ``qweight_type``, may arrive in any order)."""
    layer.gguf_blocks[shard_index] = loaded.to(layer.qweight_type.device, torch.uint8)


class GGUFNative(QuantizationMethod):
    """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights multiplied without a dense
    copy (see the module docstring)."""

    name = "gguf"
    capabilities = QuantCapabilities(
        device_types=("cpu", "cuda"),
        checkpoint_formats=("gguf",),
        # In fp32 every type is dequantized per call (torch's fp32 int4 CPU kernel is
        # scalar): the dense model decodes about twice as fast (SmolLM2: 12.0 vs 5.4 tok/s
        # eager on 2 cores), so fp32 GGUF loads dequantize unless this method is named.
        preferred_dtypes=(torch.bfloat16, torch.float16),
        bits=(4, 5, 6, 8),
        group_sizes=(16, 32),
    )

    @classmethod
    def from_config(cls, quant_config: dict[str, Any] | None) -> GGUFNative:
        method = (quant_config or {}).get("quant_method", "gguf")
        if str(method).lower() != "gguf":
            raise ValueError(f"reads GGUF files' own quantized weights, not {method!r}")
        return cls()

    def __init__(self) -> None:
        # One model's dense copies on the CPU (runtime.py): built with the method, so that
        # each model loaded in a process draws from its own budget.
        self.dense_budget = DenseCopyBudget()

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        parallel = getattr(layer, "parallel", None)
        if parallel is not None and parallel.world_size > 1:
            raise ConfigError(
                "GGUF weights kept quantized do not split across tensor-parallel ranks: "
                "use tensor_parallel_size=1, or quantization='none' to load them dense"
            )
        shards = len(getattr(layer, "output_shard_sizes", [out_features]))
        qtype = torch.full((shards,), -1, dtype=torch.int64)
        layer.qweight_type = nn.Parameter(qtype, requires_grad=False)
        set_weight_attrs(layer.qweight_type, output_dim=None, shard_indexed=True)
        # A placeholder: the bytes of each matrix go to ``gguf_blocks`` as they load.
        layer.qweight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        set_weight_attrs(layer.qweight, output_dim=None)
        layer.qweight.load_shard = _store_shard  # type: ignore[attr-defined]
        layer.gguf_blocks = {}
        layer.gguf_in_features = in_features
        layer.gguf_dtype = dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        sizes = list(getattr(layer, "output_shard_sizes", [layer.out_features]))
        types = layer.qweight_type.tolist()
        in_features = layer.gguf_in_features
        parts: list = []
        for index, rows in enumerate(sizes):
            raw = layer.gguf_blocks.pop(index, None)
            qtype = types[index]
            if raw is None or qtype < 0:
                raise ValueError(f"checkpoint matrix {index} of a GGUF linear layer is missing")
            if raw.dim() != 2 or raw.shape[0] != rows:
                raise ValueError(
                    f"GGUF matrix {index} has {tuple(raw.shape)} bytes; the layer expects "
                    f"{rows} rows of {in_features} inputs"
                )
            if qtype in DENSE_TYPES:
                parts.append(dense_rows(raw, qtype, in_features))
            else:
                parts.append(decode(raw, qtype, in_features))
        device = layer.qweight_type.device
        layer.gguf_runtime = GGUFLinearRuntime(parts, device, layer.gguf_dtype, self.dense_budget)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = layer.gguf_runtime.forward(x)
        return out + bias if bias is not None else out

    def checkpoint_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """A dense ``[out, in]`` matrix as a GGUF file stores it in Q8_0 (the ``gguf``
        package's quantizer), or in F32 where its inputs are not whole Q8_0 blocks."""
        from gguf import quantize

        array = weight.detach().float().cpu().numpy()
        qtype = REFERENCE_TYPE
        try:
            bytes_per_row(qtype, array.shape[1])
            blocks = quantize(array, qtype)
        except ValueError:
            qtype, blocks = QT.F32, array.view("uint8")
        return {
            "qweight_type": torch.tensor(int(qtype), dtype=torch.int64),
            "qweight": torch.from_numpy(blocks.copy()),
        }

    def process_model_after_loading(self, model: nn.Module) -> None:
        """On the CPU in bf16, the LM head (dense: the format dequantizes embeddings) gets
        an 8-bit copy for small batches where its weights lie on a Q8_0 grid, as the CPU's
        ``woq_grid`` method does, and an fp32 copy for many rows within the dense-copy
        budget; in fp32, a blocked copy within the budget; then the linear layers' dense
        copies get blocked copies with what the budget has left (runtime.py)."""
        from tessellm.layers.embedding import ParallelLMHead
        from tessellm_quant_int4.cpu_int4 import Int8GroupLogitsMatmul, pack_int8_groups
        from tessellm_quant_int4.onednn_weight import OneDnnWeight

        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, ParallelLMHead) or weight is None:
                continue
            if weight.device.type != "cpu":
                continue
            if weight.dtype not in INT4_KERNEL_DTYPES:
                # fp32: MKL packs the head's 49k x 576 at every call (SmolLM2; 11.3 ms a
                # token, 5.6 blocked; 36.5 / 16.2 ms at 30 rows on a 2-core EPYC).
                if OneDnnWeight.fits(weight) and self.dense_budget.take(
                    weight.numel() * weight.element_size()
                ):
                    module.logits_matmul = OneDnnWeight(weight.data).linear
                continue
            packed = _pack_rows_in_chunks(weight.data, pack_int8_groups)
            if packed is None:
                continue
            copy_dtype = dense_copy_dtype(weight.dtype)
            dense = None
            if copy_dtype != weight.dtype and self.dense_budget.take(
                weight.numel() * copy_dtype.itemsize
            ):
                dense = weight.data.to(copy_dtype)
            module.logits_matmul = Int8GroupLogitsMatmul(weight.data, packed, dense)
        add_onednn_copies(model, self.dense_budget)


# Rows packed at a time: the packer's fp32 temporaries of a whole 50k-262k vocabulary
# would be the largest allocation of the load (measured: +600 MiB for SmolLM2's head).
PACK_CHUNK_ROWS = 4096


def _pack_rows_in_chunks(weight: torch.Tensor, pack) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``pack(weight, grid_only=True)`` by chunks of rows (the int4 layout and its
    ``[K/32, N, 2]`` scales split along N), or None if any chunk is not on the grid. The
    results are allocated once and filled: chunk results kept until a final ``cat`` would
    sit between the chunks' freed temporaries and pin them (measured: +1.2 GiB of RSS for
    Gemma 3's 262k-row head)."""
    rows = weight.shape[0]
    packed = scales = None
    for start in range(0, rows, PACK_CHUNK_ROWS):
        stop = min(start + PACK_CHUNK_ROWS, rows)
        result = pack(weight[start:stop], grid_only=True)
        if result is None:
            return None
        if packed is None:
            packed = result[0].new_empty((rows, *result[0].shape[1:]))
            scales = result[1].new_empty((result[1].shape[0], rows, *result[1].shape[2:]))
        packed[start:stop] = result[0]
        scales[:, start:stop] = result[1]
        del result
    return packed, scales


def describe_layer(layer: nn.Module) -> str:
    """The runtime segments of a loaded layer (for tests and reports)."""
    runtime = getattr(layer, "gguf_runtime", None)
    return ", ".join(runtime.kinds) if runtime is not None else "not loaded"
