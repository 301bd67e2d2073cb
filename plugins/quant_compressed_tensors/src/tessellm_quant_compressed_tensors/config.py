"""A compressed-tensors ``quantization_config`` read into the one scheme tessellm runs.

llm-compressor writes, in ``config.json``::

    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                    "symmetric": true, "dynamic": false, ...},
        "input_activations": null, "output_activations": null}},
      "ignore": ["lm_head"], "quantization_status": "compressed", ...}

The config is parsed with the compressed-tensors library's own pydantic models
(``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs``), so presets and
defaults mean what they mean there. Supported, one scheme per model:

- ``wna16``: ``pack-quantized`` int weights of 4 or 8 bits, groups of 32/64/128 or one
  per output channel, symmetric or with zero points; no activation quantization.
- ``int8_w8a8``: ``int-quantized`` symmetric int8 weights (per channel or per tensor),
  int8 activations symmetric per token (dynamic) or per tensor (static).
- ``fp8_w8a8``: ``float-quantized`` e4m3 weights (per tensor or per channel), fp8
  activations per token (dynamic) or per tensor (static).
- ``fp8_weight_only``: fp8 weights without activation quantization.

A linear layer does not know its name when its weights are created, so every linear of
the model's decoder gets the one scheme: config groups must agree on it, and ``ignore``
may name only layers outside the decoder's linears (``lm_head``), which tessellm keeps
dense anyway. Anything else is refused with a ValueError naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

QUANT_METHOD = "compressed-tensors"
GROUP_SIZES = (32, 64, 128)
PACKED_BITS = (4, 8)
# HF module names of decoder linears in the families tessellm runs: an ``ignore`` entry
# matching one would leave a linear dense that the method has already made quantized.
DECODER_LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.qkv_proj",
    "self_attn.out_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp.gate_up_proj",
    "fc1",
    "fc2",
)
_LAYER_PREFIXES = ("model.layers", "model.decoder.layers", "model.language_model.layers")
_PROBE_LAYERS = 64
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class LinearScheme:
    """The scheme of every quantized linear: ``kind`` (see the module docstring), the
    library's ``QuantizationScheme`` (``weights``, ``input_activations``) and the
    compression ``format`` its tensors are stored in."""

    kind: str
    scheme: Any
    format: str

    @property
    def weights(self) -> Any:
        return self.scheme.weights

    @property
    def activations(self) -> Any:
        return self.scheme.input_activations

    @property
    def bits(self) -> int:
        return int(self.weights.num_bits)

    @property
    def group_size(self) -> int:
        """Inputs per scale: the group size, or -1 for one scale per output channel (or
        per tensor)."""
        return int(self.weights.group_size) if _value(self.weights.strategy) == "group" else -1

    @property
    def symmetric(self) -> bool:
        return bool(self.weights.symmetric)

    @property
    def static_activations(self) -> bool:
        return self.activations is not None and not self.activations.dynamic

    def describe(self) -> str:
        return describe_scheme(self.scheme, self.format)


def _value(enum_or_str: Any) -> str | None:
    return None if enum_or_str is None else str(getattr(enum_or_str, "value", enum_or_str))


def describe_args(args: Any) -> str:
    if args is None:
        return "none"
    strategy = _value(args.strategy)
    text = f"{_value(args.type)}{args.num_bits} {strategy}"
    if strategy == "group":
        text += f" {args.group_size}"
    if strategy == "block":
        text += f" {args.block_structure}"
    text += " symmetric" if args.symmetric else " asymmetric"
    return text + (" dynamic" if args.dynamic else " static")


def describe_scheme(scheme: Any, fmt: str) -> str:
    return (
        f"{fmt}: weights {describe_args(scheme.weights)}, "
        f"input activations {describe_args(scheme.input_activations)}"
    )


def default_scheme() -> LinearScheme:
    """llm-compressor's ``W4A16`` preset: int4 weights, symmetric, groups of 128."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    return LinearScheme("wna16", preset_name_to_scheme("W4A16", ["Linear"]), "pack-quantized")


def parse_quantization_config(quant_config: dict[str, Any]) -> LinearScheme:
    """The one scheme of a checkpoint's ``quantization_config``; ValueError naming what is
    not supported."""
    method = str(quant_config.get("quant_method", QUANT_METHOD)).lower()
    if method != QUANT_METHOD:
        raise ValueError(f"reads quant_method {QUANT_METHOD!r} checkpoints, not {method!r}")
    if quant_config.get("sparsity_config"):
        sparsity = quant_config["sparsity_config"]
        structure = sparsity.get("sparsity_structure", sparsity.get("format", "?"))
        raise ValueError(f"sparse checkpoints (sparsity_config {structure!r}) are not supported")
    if quant_config.get("transform_config"):
        raise ValueError("checkpoints with transforms (transform_config) are not supported")
    _refuse_group_actorder(quant_config)
    from compressed_tensors.quantization import QuantizationConfig

    try:
        config = QuantizationConfig.model_validate(quant_config)
    except ValueError as exc:  # pydantic's ValidationError is one
        detail = " ".join(str(exc).split())
        raise ValueError(f"quantization_config does not parse: {detail[:300]}") from None
    if not config.config_groups:
        raise ValueError("quantization_config has no config_groups")
    schemes = {}
    for name, scheme in config.config_groups.items():
        fmt = _value(scheme.format) or _value(config.format)
        _check_targets(name, scheme.targets)
        schemes.setdefault(describe_scheme(scheme, fmt), (name, scheme, fmt))
    if len(schemes) > 1:
        listed = "; ".join(f"{name}: {text}" for text, (name, _, _) in schemes.items())
        raise ValueError(
            "config groups with different schemes (mixed precision) are not supported: "
            f"one scheme serves every linear layer ({listed})"
        )
    ((name, scheme, fmt),) = schemes.values()
    ignore = list(config.ignore or [])
    _check_ignore(ignore)
    _check_lm_head(config, ignore)
    return LinearScheme(classify(scheme, fmt), scheme, fmt)


def _refuse_group_actorder(quant_config: dict[str, Any]) -> None:
    """Activation ordering "group" stores a ``weight_g_idx`` permutation (newer
    compressed-tensors no longer parses it); "weight"/"static" leaves the format as is."""
    for name, group in (quant_config.get("config_groups") or {}).items():
        weights = group.get("weights") if isinstance(group, dict) else None
        order = (weights or {}).get("actorder")
        if order is True or str(order).lower() in ("group", "dynamic"):
            raise ValueError(
                f"{name}: activation ordering {order!r} (weight_g_idx) is not supported"
            )


def _check_targets(group: str, targets: list[str]) -> None:
    for target in targets:
        if target != "Linear" and not target.startswith("re:"):
            raise ValueError(
                f"{group}: target {target!r} is not supported (one scheme serves every "
                "linear layer: targets 'Linear' or 're:' patterns)"
            )


def _decoder_probes() -> list[str]:
    return [
        f"{prefix}.{index}.{suffix}"
        for prefix in _LAYER_PREFIXES
        for index in range(_PROBE_LAYERS)
        for suffix in DECODER_LINEAR_SUFFIXES
    ]


def _matches(name: str, pattern: str) -> bool:
    """compressed-tensors' rule: ``re:`` entries are regexes matched at the start of the
    module name; others are exact names."""
    if pattern.startswith("re:"):
        return re.match(pattern.removeprefix("re:"), name) is not None
    return pattern == name


def _check_ignore(ignore: list[str]) -> None:
    probes: list[str] | None = None
    for entry in ignore:
        if entry.startswith("re:"):
            probes = probes or _decoder_probes()
            hit = next((name for name in probes if _matches(name, entry)), None)
        else:
            hit = entry if entry.endswith(tuple("." + s for s in DECODER_LINEAR_SUFFIXES)) else None
        if hit is not None:
            raise ValueError(
                f"ignore entry {entry!r} leaves a decoder linear layer unquantized ({hit}): "
                "tessellm-quant-compressed-tensors applies one scheme to every linear "
                "layer of the decoder, so only layers outside it (lm_head) may be ignored"
            )


def _check_lm_head(config: Any, ignore: list[str]) -> None:
    targeted = any(
        target == "Linear" or _matches(LM_HEAD, target)
        for scheme in config.config_groups.values()
        for target in scheme.targets
    )
    if targeted and not any(_matches(LM_HEAD, entry) for entry in ignore):
        raise ValueError("a quantized lm_head is not supported (list it in 'ignore')")


def classify(scheme: Any, fmt: str) -> str:
    """The kind of linear ``scheme`` stored as ``fmt`` is, or a ValueError naming it."""
    weights, acts = scheme.weights, scheme.input_activations
    what = describe_scheme(scheme, fmt)
    if weights is None:
        raise ValueError(f"activation-only quantization is not supported ({what})")
    if scheme.output_activations is not None:
        raise ValueError(f"output activation quantization is not supported ({what})")
    if weights.dynamic:
        raise ValueError(f"dynamic weight quantization is not supported ({what})")
    strategy = _value(weights.strategy)
    if strategy == "block":
        raise ValueError(f"block-wise weight scales are not supported ({what})")
    wtype = _value(weights.type)
    if wtype == "float":
        return _classify_fp8(weights, acts, fmt, strategy, what)
    if fmt == "pack-quantized":
        return _classify_packed(weights, acts, strategy, what)
    if fmt in ("int-quantized", "naive-quantized"):
        return _classify_int8(weights, acts, strategy, what)
    raise ValueError(f"format {fmt!r} is not supported ({what})")


def _classify_fp8(weights: Any, acts: Any, fmt: str, strategy: str | None, what: str) -> str:
    if weights.num_bits != 8 or fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"only fp8 (e4m3) float weights are supported, not {what}")
    if strategy not in ("tensor", "channel") or not weights.symmetric:
        raise ValueError(f"fp8 weights per tensor or per channel only, not {what}")
    if acts is None:
        return "fp8_weight_only"
    _check_activations(acts, "float", what)
    return "fp8_w8a8"


def _classify_packed(weights: Any, acts: Any, strategy: str | None, what: str) -> str:
    if acts is not None:
        raise ValueError(
            f"packed int weights with quantized activations are not supported ({what})"
        )
    if weights.num_bits not in PACKED_BITS:
        raise ValueError(
            f"{weights.num_bits}-bit packed weights are not supported (4 or 8): {what}"
        )
    if strategy == "group":
        if weights.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group size {weights.group_size} is not supported (32, 64 or 128): {what}"
            )
    elif strategy != "channel":
        raise ValueError(f"packed weights per group or per channel only, not {what}")
    return "wna16"


def _classify_int8(weights: Any, acts: Any, strategy: str | None, what: str) -> str:
    if weights.num_bits != 8 or not weights.symmetric or strategy not in ("channel", "tensor"):
        raise ValueError(
            f"int-quantized weights must be symmetric int8 per channel or tensor, not {what}"
        )
    if acts is None:
        raise ValueError(f"unpacked int8 weight-only checkpoints are not supported ({what})")
    _check_activations(acts, "int", what)
    return "int8_w8a8"


def _check_activations(acts: Any, expected_type: str, what: str) -> None:
    strategy = _value(acts.strategy)
    per_token = strategy == "token" and acts.dynamic is True
    per_tensor_static = strategy == "tensor" and acts.dynamic is False
    if (
        _value(acts.type) != expected_type
        or acts.num_bits != 8
        or not acts.symmetric
        or not (per_token or per_tensor_static)
    ):
        raise ValueError(
            "activations must be symmetric 8-bit of the weights' type, per token (dynamic) "
            f"or per tensor (static): {what} is not supported"
        )
