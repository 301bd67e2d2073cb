"""A random EAGLE head for a target, saved in the EAGLE-LLaMA layout (tests and examples:
its guesses are random, so few are accepted; outputs are the target's all the same)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def eagle_config(target: Any, num_hidden_layers: int = 1) -> dict:
    """``config.json`` of a head for ``target`` (its checkpoint directory, or its
    transformers config): a ``LlamaForCausalLM`` of the target's widths,
    ``num_hidden_layers`` layers."""
    if isinstance(target, (str, Path)):
        from transformers import AutoConfig

        target = AutoConfig.from_pretrained(target)
    target = target.get_text_config() if hasattr(target, "get_text_config") else target
    heads = target.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": target.hidden_size,
        "intermediate_size": target.intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(target, "num_key_value_heads", None) or heads,
        "head_dim": getattr(target, "head_dim", None) or target.hidden_size // heads,
        "rms_norm_eps": target.rms_norm_eps,
        "vocab_size": target.vocab_size,
        "max_position_embeddings": target.max_position_embeddings,
        "rope_theta": getattr(target, "rope_theta", None) or 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def random_eagle_weights(
    config: dict, seed: int = 0, fc_bias: bool = False, std: float = 0.08
) -> dict[str, torch.Tensor]:
    """EAGLE-LLaMA tensor names and shapes for ``config``, random (norms at 1)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    weights = {"fc.weight": normal(h, 2 * h)}
    if fc_bias:
        weights["fc.bias"] = normal(h)
    for i in range(config["num_hidden_layers"]):
        prefix = f"layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        }
        for name, shape in shapes.items():
            weights[prefix + name] = normal(*shape)
        weights[prefix + "post_attention_layernorm.weight"] = 1 + normal(h)
        if i:  # the first layer has no input norm in EAGLE-1
            weights[prefix + "input_layernorm.weight"] = 1 + normal(h)
    return weights


def save_random_eagle_head(
    target_dir: Any,
    path: Path | str,
    *,
    seed: int = 0,
    num_hidden_layers: int = 1,
    fc_bias: bool = False,
    with_embedding: bool = True,
) -> Path:
    """A random head for the target at ``target_dir`` (or of the transformers config
    given), saved in ``path``: ``config.json`` and ``model.safetensors`` (with a copy of
    the target's embedding from its safetensors, as the published heads carry one, unless
    ``with_embedding`` is false). Returns ``path``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = eagle_config(target_dir, num_hidden_layers)
    weights = random_eagle_weights(config, seed, fc_bias)
    if with_embedding and isinstance(target_dir, (str, Path)):
        for file in sorted(Path(target_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if name.endswith("embed_tokens.weight"):
                        weights["embed_tokens.weight"] = f.get_tensor(name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path
