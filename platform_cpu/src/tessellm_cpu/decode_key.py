"""The compiled-decode cache key: a hash of everything that shapes a library.

Torch and transformers versions, the sources of every package whose code the trace may
run, whatever it is called (:func:`traced_module_names`), the model's class and config,
dtype, the input tensors' names, shapes and dtypes, threads, CPU capability, the batch
range and the query tokens per sequence. The libraries hold no weights, so the weights'
values are not in it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import types
from pathlib import Path

import torch
import transformers
from torch import nn

import tessellm
from tessellm.interfaces.ops import FusedOps

CACHE_FORMAT = 1

# Packages whose versions are in the key instead of their sources (and the standard
# library, which comes with the Python version).
VERSIONED_PACKAGES = {"torch": torch.__version__, "transformers": transformers.__version__}


# Attribute values that hold no code of their own (submodules are walked as modules).
_NOT_CODE = (torch.Tensor, nn.Module, dict, list, tuple, set, str, bytes, int, float, bool)


def _defining_modules(obj: object) -> set[str]:
    """Modules whose code ``obj`` runs: those defining its class and the class's bases, or
    the module of a function (a fused-op entry); a fused-op table's entries each."""
    if isinstance(obj, FusedOps):
        entries = (getattr(obj, name) for name in obj.names())
        return {type(obj).__module__} | {getattr(f, "__module__", None) or "" for f in entries}
    if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
        func = obj.func if isinstance(obj, functools.partial) else obj
        return {getattr(func, "__module__", None) or ""}
    return {cls.__module__ for cls in type(obj).__mro__}


def traced_module_names(model: nn.Module) -> set[str]:
    """Every module the traced step may run code of: those defining the model's modules'
    classes (their bases included) and the objects they hold (attention backend,
    quantization method, fused-op table) and those objects' own, whatever their package
    is called."""
    names = {__name__, "tessellm.layers", "tessellm.interfaces"}
    seen: set[int] = set()

    def held(owner: object, depth: int) -> None:
        for value in getattr(owner, "__dict__", {}).values():
            if isinstance(value, _NOT_CODE) or id(value) in seen:
                continue
            seen.add(id(value))
            names.update(_defining_modules(value))
            if depth:
                held(value, depth - 1)

    for module in model.modules():
        names |= _defining_modules(module)
        held(module, 1)
    return {n for n in names if n}


_PLAIN = (int, float, str, bool, type(None))


def _settings_of(obj: object) -> str:
    """``obj``'s class and its plain settings (numbers, strings, dataclasses, tuples of
    them): two quantization methods of one package whose classes differ or that are built
    differently (W8A8 vs weight-only int8) must not share a library."""

    def plain(value: object) -> bool:
        if isinstance(value, tuple):
            return all(plain(v) for v in value)
        return isinstance(value, _PLAIN) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        )

    cls = type(obj)
    state = sorted((k, repr(v)) for k, v in getattr(obj, "__dict__", {}).items() if plain(v))
    return f"{cls.__module__}.{cls.__qualname__}{state}"


def held_objects_settings(model: nn.Module) -> list[str]:
    """The settings (:func:`_settings_of`) of the code-bearing objects the model's modules
    hold (quantization method, attention backend, fused-op table), each once."""
    found: set[str] = set()
    for module in model.modules():
        for value in vars(module).values():
            functions = (types.FunctionType, types.MethodType, functools.partial)
            # Model configs are in the key already, as JSON (and their repr names a path).
            if value is None or hasattr(value, "to_json_string"):
                continue
            if not isinstance(value, (*_NOT_CODE, *functions)):
                found.add(_settings_of(value))
    return sorted(found)


def _source_roots(name: str) -> set[Path]:
    """What to hash for module ``name``: its whole top-level package (directories), so
    that the key does not depend on which of its modules a command happened to import;
    core by the sub-package holding the module (its layers and interfaces, not its CLI or
    server). Nothing for torch, transformers and the standard library."""
    top = name.partition(".")[0]
    if top in VERSIONED_PACKAGES or top in sys.stdlib_module_names or top == "builtins":
        return set()
    if top == "tessellm":
        file = getattr(sys.modules.get(name), "__file__", None)
        if file is None:
            return set()
        path, core = Path(file), Path(tessellm.__file__).parent
        return {path.parent if path.parent != core else path}
    module = sys.modules.get(top)
    paths = getattr(module, "__path__", None)
    if paths is not None:
        return {Path(p) for p in paths}
    file = getattr(module, "__file__", None)
    return {Path(file)} if file else set()


def _digest(roots: set[Path]) -> str:
    h = hashlib.sha256()
    for root in sorted(roots):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            # Relative names: the same sources in another checkout give the same key.
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def traced_sources_digest(model: nn.Module) -> str:
    """A hash of the code a trace of ``model`` may run (:func:`traced_module_names`), by
    whole package directories (the runner takes it once, when it is made)."""
    roots = {root for name in traced_module_names(model) for root in _source_roots(name)}
    return _digest(roots)


def library_key(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    kv_caches: list[torch.Tensor],
    batch_range: tuple[int, int],
    sources_digest: str,
    query_len: int = 1,
    kv_layout: list[list[int]] | None = None,
) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    facts = {
        "format": CACHE_FORMAT,
        "versions": VERSIONED_PACKAGES,
        "model": type(model).__qualname__,
        "held": held_objects_settings(model),
        "config": config.to_json_string() if hasattr(config, "to_json_string") else "",
        "batch_range": list(batch_range),
        # Query tokens per sequence: 1 + k for a speculative verification library.
        **({"query_len": query_len} if query_len != 1 else {}),
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        # The caches' block count is a dynamic dimension (it follows free memory).
        "kv_caches": [(list(c.shape[1:]), str(c.dtype)) for c in kv_caches],
        # Several KV groups: each layer's group and caches (absent for one group).
        **({"kv_layout": kv_layout} if kv_layout else {}),
        "weights": [
            (name, list(t.shape), str(t.dtype), list(t.stride())) for name, t in weights.items()
        ],
    }
    h.update(json.dumps(facts, sort_keys=True).encode())
    h.update(sources_digest.encode())
    return h.hexdigest()[:32]
