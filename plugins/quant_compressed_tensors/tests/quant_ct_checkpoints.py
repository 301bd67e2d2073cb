"""compressed-tensors checkpoints built with the compressed-tensors library the way
llm-compressor builds them, and their dequantization written out independently.

llm-compressor: attach the scheme (``apply_quantization_config``), observe each weight's
min/max (and, for static activations, each layer's input range over calibration data),
turn them into scales and zero points (``calculate_qparams``), compress
(``ModelCompressor.compress_model``), ``save_pretrained`` and write the config
(``ModelCompressor.update_config``). The observer below is that min/max observer.

The dequantization (:func:`dequantize_linear`) reads the stored tensors with plain integer
arithmetic, ``w = (q - z) * s`` (no compressed-tensors code, no plugin code)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# compressed-tensors imports triton, and Triton decides whether kernels are interpreted
# when it is first imported: without a GPU, interpreted (test_ct_triton.py, and any other
# Triton test later in the same process), so set before any test imports the library.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def scheme(preset: str, **weight_overrides):
    """The library's preset scheme for every ``Linear``, weights' fields overridden."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    result = preset_name_to_scheme(preset, ["Linear"])
    for key, value in weight_overrides.items():
        setattr(result.weights, key, value)
    if weight_overrides.get("strategy") == "channel":
        result.weights.group_size = None
    return result


def static_int8_scheme(weight_strategy: str = "channel"):
    """W8A8 int8 with a static per-tensor activation scale (llm-compressor writes it
    from a recipe; no preset)."""
    from compressed_tensors.quantization import QuantizationArgs

    result = scheme("W8A8", strategy=weight_strategy)
    result.input_activations = QuantizationArgs(
        num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False
    )
    return result


def quant_config_dict(linear_scheme, fmt: str, ignore=("lm_head",)) -> dict:
    """``quantization_config`` as llm-compressor writes it into config.json."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    group = linear_scheme.model_copy(update={"format": fmt})
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=list(ignore), format=fmt)
    config.quantization_status = QuantizationStatus.COMPRESSED
    data = json.loads(config.model_dump_json())
    data.update(quant_method="compressed-tensors", sparsity_config={}, transform_config={})
    return data


def observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The min/max observer: ranges per tensor ``[1]``, output channel ``[N, 1]`` or group
    of inputs ``[N, K / G]``."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        w = weight.reshape(weight.shape[0], -1, args.group_size)
        return w.amin(dim=-1), w.amax(dim=-1)
    if strategy == "channel":
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    return weight.amin().reshape(1), weight.amax().reshape(1)


def library_tensors(weight: torch.Tensor, linear_scheme, fmt: str, input_amax: float = 4.0):
    """One linear's stored tensors, by the library's compressor for ``fmt``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(
        *observe(weight, linear_scheme.weights), linear_scheme.weights
    )
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    tensors = dict(BaseCompressor.get_value_from_registry(fmt).compress(state, linear_scheme))
    acts = linear_scheme.input_activations
    if acts is not None and not acts.dynamic:
        bound = torch.tensor([input_amax])
        tensors["input_scale"] = calculate_qparams(-bound, bound, acts)[0]
    return tensors


def _unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Values ``0 .. count-1`` of each row of int32 words, value ``i`` in bits
    ``[i * bits, (i + 1) * bits)`` of the row's bit string (words low bits first)."""
    per_word = 32 // bits
    out = torch.empty(words.shape[0], count, dtype=torch.int64)
    as_unsigned = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(count):
        out[:, i] = (as_unsigned[:, i // per_word] >> (bits * (i % per_word))) & ((1 << bits) - 1)
    return out - (1 << (bits - 1))  # stored with the offset 2**(bits-1)


def dequantize_linear(tensors: dict[str, torch.Tensor], linear_scheme) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight the stored tensors mean."""
    args = linear_scheme.weights
    scale = tensors["weight_scale"].float()
    if "weight_packed" in tensors:
        n, k = (int(v) for v in tensors["weight_shape"])
        q = _unpack(tensors["weight_packed"], args.num_bits, k).float()
    else:
        q = tensors["weight"].float()
        n, k = q.shape
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    zero = torch.zeros_like(scale)
    if "weight_zero_point" in tensors:
        zero = _unpack(tensors["weight_zero_point"].t(), args.num_bits, n).t().float()
    per_input = k // scale.shape[1]
    return (q - zero.repeat_interleave(per_input, dim=1)) * scale.repeat_interleave(
        per_input, dim=1
    )


def calibrate_input_amax(model, calibration: list[list[int]]) -> dict[str, float]:
    """Each linear's largest input magnitude over the calibration sequences."""
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if LINEAR.search(name):

            def record(_module, args, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))

            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        for ids in calibration:
            model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return amax


def write_ct_checkpoint(
    dense: Path, out: Path, linear_scheme, calibration: list[list[int]] | None = None
) -> tuple[Path, Path]:
    """``dense`` (an HF checkpoint) compressed with ``linear_scheme`` into ``out`` as
    llm-compressor does, and the dense model of its dequantized weights in
    ``out/dequantized`` (:func:`dequantize_linear`). Returns both paths."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    acts = linear_scheme.input_activations
    amax = calibrate_input_amax(model, calibration or [[1, 2, 3]]) if acts is not None else {}
    config = QuantizationConfig(config_groups={"group_0": linear_scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        assert LINEAR.search(name), name
        args = module.quantization_scheme.weights
        scale, zero_point = calculate_qparams(*observe(module.weight.data, args), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        if acts is not None and not acts.dynamic:
            bound = torch.tensor([amax[name]])
            module.input_scale.data.copy_(calculate_qparams(-bound, bound, acts)[0])
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    for file in dense.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, out / file.name)
    return out, write_dequantized(out, linear_scheme)


def write_dequantized(quantized: Path, linear_scheme) -> Path:
    """The dense checkpoint of ``quantized``'s dequantized weights (no quantization)."""
    target = quantized / "dequantized"
    shutil.copytree(quantized, target, ignore=shutil.ignore_patterns("*.safetensors"))
    stored = {}
    for file in sorted(quantized.glob("*.safetensors")):
        stored.update(load_file(file))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    dense = {}
    for name, tensor in stored.items():
        prefix, _, leaf = name.rpartition(".")
        if LINEAR.search(prefix):
            by_layer.setdefault(prefix, {})[leaf] = tensor
        else:
            dense[name] = tensor
    for prefix, tensors in by_layer.items():
        dense[prefix + ".weight"] = dequantize_linear(tensors, linear_scheme)
    save_file(dense, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
