"""Reading a PEFT LoRA adapter and mapping its matrices onto tessellm's layers.

PEFT names each pair after the HF module it adapts (``...self_attn.q_proj.lora_A.weight``,
``lora_B.weight``); tessellm fuses some of those modules (``q_proj``/``k_proj``/``v_proj``
into ``qkv_proj``, ``gate_proj``/``up_proj`` into ``gate_up_proj``). The family's own
checkpoint rules (``weight_renames``, ``weight_rules``) say where each HF module went and
which piece of the fused layer it is, so an adapter maps exactly as the base weights do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessellm.errors import InvalidRequestError
from tessellm.layers.weight_loading import parameter_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """What ``adapter_config.json`` says that changes the weights' effect."""

    rank: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with PEFT's per-module overrides
        (a pattern matches the end of a module's dotted name)."""
        rank = _by_pattern(self.rank_pattern, module, self.rank)
        alpha = _by_pattern(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def max_rank(self) -> int:
        return max([self.rank, *self.rank_pattern.values()])


def _by_pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return default


def read_adapter_config(path: str | Path, max_lora_rank: int) -> AdapterConfig:
    """The adapter's config, checked: ``InvalidRequestError`` naming the problem (missing
    files, a rank above ``max_lora_rank``, options tessellm does not run)."""
    folder = Path(path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise InvalidRequestError(f"no LoRA adapter at {str(path)!r}: {CONFIG_FILE} not found")
    if not (folder / WEIGHTS_FILE).is_file():
        raise InvalidRequestError(
            f"the LoRA adapter at {str(path)!r} has no {WEIGHTS_FILE} (only safetensors "
            "adapters are read: never pickled .bin files)"
        )
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read {config_file}: {exc}") from None
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidRequestError(f"{config_file}: peft_type {raw.get('peft_type')!r} is not LORA")
    for option, off in (("use_dora", False), ("bias", "none")):
        if raw.get(option, off) not in (off, None):
            raise InvalidRequestError(f"{config_file}: {option}={raw[option]!r} is not supported")
    if raw.get("fan_in_fan_out"):
        raise InvalidRequestError(f"{config_file}: fan_in_fan_out adapters are not supported")
    config = AdapterConfig(
        rank=int(raw.get("r", 8)),
        alpha=float(raw.get("lora_alpha", 8)),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )
    if not 1 <= config.max_rank <= max_lora_rank:
        raise InvalidRequestError(
            f"the LoRA adapter at {str(path)!r} has rank {config.max_rank}; this engine takes "
            f"ranks up to max_lora_rank={max_lora_rank}"
        )
    return config


@dataclass(slots=True)
class AdapterWeights:
    """An adapter's matrices by tessellm layer: ``layers[name][shard] = (A, B * scaling)``,
    ``A`` ``[r, in]`` and ``B`` ``[out, r]`` as the checkpoint holds them (full size: each
    rank takes its slice when they enter a slot)."""

    config: AdapterConfig
    layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


def shard_index(layer: Any, shard: tuple[Any, ...]) -> int:
    """Which piece of a fused layer a checkpoint matrix is (0 for a plain layer)."""
    if not shard:
        return 0
    piece = shard[0]
    return "qkv".index(piece) if isinstance(piece, str) else int(piece)


def load_adapter_weights(
    path: str | Path, model: torch.nn.Module, max_lora_rank: int
) -> AdapterWeights:
    """Read the adapter at ``path`` for ``model`` (a family with ``weight_rules``)."""
    from safetensors.torch import load_file

    from tessellm.layers.linear import _ParallelLinear

    config = read_adapter_config(path, max_lora_rank)
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        for kind in ("lora_A", "lora_B"):
            marker = f".{kind}."
            if marker in name:
                module = name.split(marker)[0].removeprefix(PEFT_PREFIX)
                pairs.setdefault(module, {})[kind] = tensor
                break
        else:
            raise InvalidRequestError(
                f"the LoRA adapter at {str(path)!r} has {name!r}: only LoRA A/B matrices of "
                "linear layers are supported (not embeddings, the LM head or modules_to_save)"
            )
    renames = getattr(model, "weight_renames", ())
    rules = getattr(model, "weight_rules", ())
    modules = dict(model.named_modules())
    layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for hf_module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidRequestError(f"LoRA adapter {hf_module!r} lacks lora_A or lora_B")
        name = hf_module + ".weight"
        for old, new in renames:
            name = name.replace(old, new)
        target, shard = parameter_name(name, rules)
        layer_name = target.removesuffix(".weight")
        layer = modules.get(layer_name)
        if not isinstance(layer, _ParallelLinear):
            raise InvalidRequestError(
                f"the LoRA adapter adapts {hf_module!r}, which is not a linear layer of "
                f"{type(model).__name__} (only attention and MLP projections are supported)"
            )
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidRequestError(
                f"LoRA matrices of {hf_module!r} have shapes that do not pair"
            )
        if a.shape[0] > max_lora_rank:
            raise InvalidRequestError(
                f"LoRA rank {a.shape[0]} of {hf_module!r} is above max_lora_rank={max_lora_rank}"
            )
        scaled_b = b.float() * config.scaling(hf_module)
        layers.setdefault(layer_name, {})[shard_index(layer, shard)] = (a.float(), scaled_b)
    return AdapterWeights(config, layers)
