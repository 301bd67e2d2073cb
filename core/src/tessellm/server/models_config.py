"""Which base models one server serves: repeatable ``--model``, or ``--models-config FILE``
(YAML or JSON: a list of ``{model, served_model_name, <engine arguments> ...}``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError

# Keys of a config entry that are not engine arguments.
SPEC_KEYS = ("model", "served_model_name", "lora_modules", "data_parallel_size")


@dataclass
class ModelSpec:
    """One base model a server serves: its engine arguments and the names clients use
    (the first is the one answers carry for it)."""

    names: list[str]
    args: EngineArgs
    data_parallel_size: int = 1
    lora_modules: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]


def read_models_config(path: str) -> list[dict[str, Any]]:
    """The entries of a models config file: a list (or ``{"models": [...]}``) of mappings,
    each with a ``model``. ``ConfigError`` names what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--models-config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON; pyyaml comes with transformers

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"--models-config: {path} is not valid YAML or JSON: {exc}") from None
    if isinstance(data, dict) and "models" in data:
        data = data["models"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--models-config: {path} must hold a non-empty list of models")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise ConfigError(
                f"--models-config: entry {i} of {path} must be a mapping with a 'model' (a path "
                f"or name), got {entry!r}"
            )
    return data


def _names(value: Any, model: str) -> list[str]:
    if value is None:
        return [model]
    names = [value] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"served_model_name of {model!r} must be a name or a list of names")
    return names


def _adapters(value: Any, model: str) -> list[tuple[str, str]]:
    """``lora_modules`` as ``name=path`` strings, a ``{name: path}`` mapping, or vLLM's
    ``[{"name": ..., "path": ...}]``."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(str(k), str(v)) for k, v in value.items()]
    pairs = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict) and "name" in item and "path" in item:
            pairs.append((str(item["name"]), str(item["path"])))
            continue
        name, sep, path = str(item).partition("=")
        if not (sep and name and path):
            raise ConfigError(f"lora_modules of {model!r}: expected name=path, got {item!r}")
        pairs.append((name, path))
    return pairs


def _engine_args(base: EngineArgs, model: str, names: list[str], entry: dict[str, Any]) -> Any:
    overrides = {k: v for k, v in entry.items() if k not in SPEC_KEYS}
    known = {f.name for f in fields(EngineArgs)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"unknown engine argument(s) for {model!r}: {', '.join(unknown)} (known: model, "
            f"served_model_name, lora_modules, data_parallel_size, {', '.join(sorted(known))})"
        )
    if entry.get("lora_modules"):
        overrides.setdefault("enable_lora", True)
    try:
        return replace(base, model=model, served_model_name=names[0], **overrides)
    except TypeError as exc:
        raise ConfigError(f"engine arguments of {model!r}: {exc}") from None


def build_model_specs(
    base: EngineArgs,
    cli_models: list[str],
    cli_names: list[str],
    config_entries: list[dict[str, Any]],
    data_parallel_size: int = 1,
    cli_lora_modules: list[tuple[str, str]] | None = None,
) -> list[ModelSpec]:
    """The models to serve, in order (the first answers requests that name none): the
    command line's, then the config file's. The command line's engine flags apply to
    every model; a config entry's keys override them. ``--served-model-name`` gives the
    one command-line model its names, or with several ``--model`` one name each; the
    command line's ``--lora-modules`` go with the first model."""
    specs = []
    if cli_names and not cli_models:
        raise ConfigError(
            "--served-model-name names the command line's --model; give the models of "
            "--models-config their names with served_model_name"
        )
    if len(cli_models) > 1 and cli_names and len(cli_names) != len(cli_models):
        raise ConfigError(
            f"{len(cli_models)} models but {len(cli_names)} --served-model-name: give one name "
            "per --model (or none), or list the models in --models-config"
        )
    for i, model in enumerate(cli_models):
        names = ([cli_names[i]] if len(cli_models) > 1 else cli_names) if cli_names else [model]
        args = replace(base, model=model, served_model_name=names[0])
        specs.append(ModelSpec(names, args, data_parallel_size))
    for entry in config_entries:
        model = entry["model"]
        names = _names(entry.get("served_model_name"), model)
        dp = entry.get("data_parallel_size", data_parallel_size)
        if not isinstance(dp, int) or dp < 1:
            raise ConfigError(f"data_parallel_size of {model!r} must be a positive integer")
        adapters = _adapters(entry.get("lora_modules"), model)
        specs.append(ModelSpec(names, _engine_args(base, model, names, entry), dp, adapters))
    if not specs:
        raise ConfigError("no model to serve")
    if cli_lora_modules:
        specs[0].lora_modules = [*cli_lora_modules, *specs[0].lora_modules]
        specs[0].args = replace(specs[0].args, enable_lora=True)
    seen: set[str] = set()
    for spec in specs:
        for name in [*spec.names, *(n for n, _ in spec.lora_modules)]:
            if name in seen:
                raise ConfigError(
                    f"the name {name!r} is served twice; give each model (and adapter) its "
                    "own name with served_model_name"
                )
            seen.add(name)
    return specs
