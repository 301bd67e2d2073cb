"""Random LoRA adapters in PEFT's format for a Llama-shaped config, without PEFT or a hub.

For tests and benchmarks that need adapters of a given rank on a model known only by its
``config.json`` (a tiny test model, a ``random:`` preset). The files are what PEFT's
``save_pretrained`` writes for a causal LM: ``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A/B.weight``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each projection of a Llama-style decoder layer."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_random_adapter(
    config: dict[str, Any] | str | Path,
    out_dir: str | Path,
    rank: int,
    *,
    seed: int = 0,
    targets: tuple[str, ...] | list[str] = ALL_PROJECTIONS,
    alpha: float | None = None,
    std: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Write a rank-``rank`` adapter on ``targets`` of every layer into ``out_dir``.

    ``config``: the base model's HF config (a dict, or a ``config.json`` path or its
    folder). ``A`` and ``B`` are normal with standard deviation ``std`` (PEFT starts ``B``
    at zero, which would change nothing), stored in ``dtype``. Returns ``out_dir`` as a
    string.
    """
    from safetensors.torch import save_file

    if not isinstance(config, dict):
        path = Path(config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    shapes = projection_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            module = f"base_model.model.model.layers.{layer}.{group}.{target}"
            fan_in, fan_out = shapes[target]
            a = torch.randn(rank, fan_in, generator=gen) * std
            b = torch.randn(fan_out, rank, generator=gen) * std
            tensors[f"{module}.lora_A.weight"] = a.to(dtype)
            tensors[f"{module}.lora_B.weight"] = b.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": float(alpha if alpha is not None else 2 * rank),
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return str(out)
