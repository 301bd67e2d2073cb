"""fp8 checkpoints written with plain torch, as vLLM / AutoFP8 / llm-compressor store them,
independently of the plugin's own quantizer: every linear's ``weight`` (float8_e4m3fn),
``weight_scale`` (float32, ``[]`` per tensor or ``[N, 1]`` per channel) and, for a static
activation scheme, ``input_scale`` (float32 ``[]``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def fp8_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().max() / E4M3_MAX
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale.reshape(())


def fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1, keepdim=True) / E4M3_MAX
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The independent dequantization: every fp8 value times its (broadcast) scale, in
    float32."""
    return q.to(torch.float32) * scale.to(torch.float32)


def write_fp8_checkpoint(
    dense: Path,
    fp8: Path,
    dequant: Path,
    *,
    per_channel: bool,
    activation_scheme: str = "dynamic",
    input_scale: float = 0.05,
) -> dict[str, torch.Tensor]:
    """From the dense HF directory ``dense``: an fp8 checkpoint in ``fp8`` and the dense
    model of its dequantized weights in ``dequant`` (same config and tokenizer). Returns
    the fp8 tensors written, by name."""
    tensors = {}
    for file in sorted(dense.glob("*.safetensors")):
        tensors.update(load_file(file))
    stored, dense_again = {}, {}
    for name, w in tensors.items():
        if not LINEAR.search(name):
            stored[name] = dense_again[name] = w
            continue
        q, scale = fp8_per_channel(w) if per_channel else fp8_per_tensor(w)
        prefix = name.removesuffix("weight")
        stored[name], stored[prefix + "weight_scale"] = q, scale
        if activation_scheme == "static":
            stored[prefix + "input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
        dense_again[name] = dequantized(q, scale).to(w.dtype)
    config = json.loads((dense / "config.json").read_text())
    for out, weights, quantized in ((fp8, stored, True), (dequant, dense_again, False)):
        shutil.copytree(dense, out, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
        out_config = dict(config)
        if quantized:
            out_config["quantization_config"] = {
                "quant_method": "fp8",
                "activation_scheme": activation_scheme,
            }
        (out / "config.json").write_text(json.dumps(out_config, indent=2))
    return stored
