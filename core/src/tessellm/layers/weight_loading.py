"""From checkpoint names to parameters: renames, fused-parameter rules, sharded loaders.

A family states how its checkpoint's names differ from its parameters' names as data
(``renames`` and ``WeightRule``s); ``load_by_rules`` does the rest. A parameter's owner
module may define ``weight_loader(param, tensor, *shard)`` to take only its
tensor-parallel slice or to place one piece of a fused matrix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.layers.attention import load_kv_cache_scale
from tessellm.layers.linear import default_weight_loader

FLOAT8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)

ShardOf = Callable[[re.Match[str]], tuple[Any, ...]]


class WeightRule(NamedTuple):
    """Checkpoint names that ``regex`` finds load into the parameter named by replacing the
    match with ``target`` (a ``re`` template); the owner's ``weight_loader`` receives
    ``shard(match)`` as extra arguments (which piece of a fused parameter this is)."""

    regex: re.Pattern[str]
    target: str
    shard: ShardOf


def weight_rule(pattern: str, target: str, shard: ShardOf | tuple[Any, ...] = ()) -> WeightRule:
    shard_of = shard if callable(shard) else (lambda _match, fixed=shard: fixed)
    return WeightRule(re.compile(pattern), target, shard_of)


def stacked_rules(pieces: Iterable[tuple[str, str, Any]]) -> tuple[WeightRule, ...]:
    """Rules for ``(checkpoint piece, fused piece, shard id)`` triples, e.g. ``q_proj`` →
    ``qkv_proj`` shard ``"q"``: separate checkpoint matrices loaded into one parameter."""
    return tuple(
        weight_rule(rf"\.{re.escape(ckpt)}\.", f".{fused}.", (shard,))
        for ckpt, fused, shard in pieces
    )


# The fused attention and gated-MLP projections of tessellm's decoder layers.
QKV_GATE_UP_RULES = stacked_rules(
    (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )
)


def parameter_name(name: str, rules: Sequence[WeightRule]) -> tuple[str, tuple[Any, ...]]:
    """The parameter a checkpoint tensor loads into, and the shard arguments; first rule wins."""
    for rule in rules:
        match = rule.regex.search(name)
        if match:
            target = name[: match.start()] + match.expand(rule.target) + name[match.end() :]
            return target, rule.shard(match)
    return name, ()


def load_by_rules(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    rules: Sequence[WeightRule] = (),
    renames: Sequence[tuple[str, str]] = (),
    skip: Callable[[str], bool] = lambda _name: False,
) -> set[str]:
    """Load ``(checkpoint name, tensor)`` pairs into ``model``; returns the parameter names
    loaded. ``renames`` are plain substring replacements applied first; names that ``skip``
    accepts, or that name no parameter, are ignored (the caller checks what is missing)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for checkpoint_name, tensor in weights:
        name = checkpoint_name
        for old, new in renames:
            name = name.replace(old, new)
        if skip(name):
            continue
        target, shard = parameter_name(name, rules)
        param = params.get(target)
        if param is None:
            load_kv_cache_scale(model, target, tensor)  # an fp8 KV cache's per-layer scale
            continue
        owner = model.get_submodule(target.rpartition(".")[0])
        loader = getattr(owner, "weight_loader", None)
        if tensor.dtype in FLOAT8_DTYPES and param.dtype not in FLOAT8_DTYPES:
            # Casting would keep the values without their scales: silently wrong weights.
            raise ModelLoadError(
                f"{checkpoint_name} holds {str(tensor.dtype).removeprefix('torch.')} "
                f"weights, but {target} is a {str(param.dtype).removeprefix('torch.')} "
                f"parameter of {type(owner).__name__}, which the checkpoint's quantization "
                "method does not handle (quantized MoE experts are not supported yet)"
            )
        tensor = tensor.to(param.dtype)
        if loader is not None:
            loader(param, tensor, *shard)
        elif shard:
            raise ValueError(f"{target} is fused but {type(owner).__name__} has no weight_loader")
        else:
            default_weight_loader(param, tensor)
        loaded.add(target)
    return loaded
