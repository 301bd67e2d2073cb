"""A GGUF file's tensors for the ``gguf`` quantization method: linear weights as raw
blocks (``<prefix>.qweight_type``, ``<prefix>.qweight``), everything else dense.

Names come from transformers' GGUF integration, as in the dense path: a weightless HF
model gives ``get_gguf_hf_weights_map`` the names, and the architecture's
``TensorProcessor`` undoes llama.cpp's changes to tensors. For the architectures below the
processors change a linear weight at most by permuting its rows (Llama's Q/K heads), and
a row permutation moves whole rows of blocks, so it runs on the raw blocks unchanged.
Other tensors, and linear weights of types not kept quantized, are dequantized by the
``gguf`` package and processed exactly as transformers does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tessellm_gguf.blocks import KEPT_TYPES, QT
from tessellm_gguf.tensor_table import map_file, read_tensor_table

# model_type of the HF configs whose GGUF tensors load natively (separate q/k/v and
# gate/up matrices; processors that only permute rows of linear weights).
NATIVE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"}
)
# GGUF names of the linear weights that tessellm's decoder layers run through their
# quantization method.
LINEAR_TENSORS = frozenset(
    {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
)

# Tensors outside the blocks that every supported model has a parameter for.
_TOP_LEVEL = frozenset({"token_embd", "output", "output_norm"})


def supports_native(config: Any) -> bool:
    return getattr(config, "model_type", None) in NATIVE_MODEL_TYPES


def _is_linear_weight(gguf_name: str) -> bool:
    parts = gguf_name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_TENSORS


def _skeleton(config: Any) -> nn.Module:
    """A weightless HF model of ``config`` (its names and module types)."""
    import copy

    from transformers import AutoModelForCausalLM

    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config  # not a transformers quantizer's config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(plain)


def _linear_prefixes(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings()
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def gguf_to_hf_names(
    skeleton: nn.Module, processor: Any, architecture: str, num_layers: int, needed: list[str]
) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name. transformers' ``get_gguf_hf_weights_map``
    rebuilds gguf's name table once per submodule (seconds per load; the dense path hides
    it in its conversion cache); the model's own names map the supported architectures in
    one pass, and transformers' function runs only if a ``needed`` name stays unmapped."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    mapping: dict[str, str] = {}
    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is not None:
        name_map = get_tensor_name_map(arch, num_layers)
        for param_name in skeleton.state_dict():
            hf_name = processor.preprocess_name(param_name)
            base, dot, suffix = hf_name.rpartition(".")
            if suffix not in ("weight", "bias"):
                base, dot, suffix = hf_name, "", ""
            gguf_name = name_map.get_name(base)
            if gguf_name is not None:
                mapping[gguf_name + dot + suffix] = hf_name
    if any(name not in mapping for name in needed):
        mapping = get_gguf_hf_weights_map(skeleton, processor)
    return mapping


# Rows of an embedding dequantized at a time (fp32 temporaries of this many rows only).
DEQUANT_CHUNK_ROWS = 4096


def _dense_matrix(raw: np.ndarray, entry: Any, processor: Any, dtype: torch.dtype) -> torch.Tensor:
    """A matrix that is not a linear layer's (the embedding, an untied LM head) dense in
    ``dtype``, dequantized by chunks of rows: no fp32 copy of a 50k-262k vocabulary. The
    supported architectures' processors leave these tensors as they are; they still see
    every chunk, so a row-wise change would apply."""
    from gguf import dequantize

    out = torch.empty(entry.shape, dtype=dtype)
    for start in range(0, entry.shape[0], DEQUANT_CHUNK_ROWS):
        rows = raw[start : start + DEQUANT_CHUNK_ROWS]
        dense = dequantize(rows, QT(entry.qtype))
        dense = processor.process(weights=dense, name=entry.name).weights
        out[start : start + len(rows)] = torch.from_numpy(np.asarray(dense, dtype=np.float32))
    return out


def iter_native_weights(
    path: Path, config: Any, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the GGUF file at ``path`` for the ``gguf`` method: linear weights as
    raw blocks, the embedding and LM head dense in ``dtype``, vectors in fp32."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    table = read_tensor_table(path)
    data = map_file(path)
    skeleton = _skeleton(config)
    processor_cls = TENSOR_PROCESSORS.get(table.architecture, TensorProcessor)
    processor = processor_cls(config=config.to_dict())
    needed = [e.name for e in table.tensors if _is_linear_weight(e.name)]
    needed += [e.name for e in table.tensors if e.name.split(".")[0] in _TOP_LEVEL]
    num_layers = config.num_hidden_layers
    mapping = gguf_to_hf_names(skeleton, processor, table.architecture, num_layers, needed)
    linears = _linear_prefixes(skeleton)
    del skeleton
    parsed: dict[str, dict] = {"tensors": {}}
    for entry in table.tensors:
        raw = table.raw(data, entry)
        hf_name = mapping.get(entry.name)
        prefix = hf_name.removesuffix(".weight") if hf_name else None
        linear = prefix in linears and _is_linear_weight(entry.name) and len(entry.shape) == 2
        if linear and entry.qtype in KEPT_TYPES:
            blocks = processor.process(weights=raw, name=entry.name).weights
            yield f"{prefix}.qweight_type", torch.tensor(entry.qtype, dtype=torch.int64)
            yield f"{prefix}.qweight", torch.from_numpy(np.array(blocks, copy=True))
            continue
        if not linear and hf_name is not None and len(entry.shape) == 2:
            yield hf_name, _dense_matrix(raw, entry, processor, dtype)
            continue
        dense = dequantize(raw, QT(entry.qtype))
        result = processor.process(
            weights=dense, name=entry.name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        if result.name is None or result.name not in mapping:
            continue  # handled by the processor itself (collected below), or not a weight
        dense = np.ascontiguousarray(result.weights, dtype=np.float32)
        if not dense.flags.writeable:  # F32 tensors come back as views of the file
            dense = dense.copy()
        if linear:  # a matrix the file keeps in float (or a type not kept): F32 rows
            yield f"{prefix}.qweight_type", torch.tensor(int(QT.F32), dtype=torch.int64)
            yield f"{prefix}.qweight", torch.from_numpy(dense.view(np.uint8))
        else:
            yield mapping[result.name], torch.from_numpy(dense)
    yield from parsed["tensors"].items()
