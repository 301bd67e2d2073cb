"""Loading and unloading a model for the router: fetch and check it first, what its
failure tells the client, how much memory it takes, and giving that memory back."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from tessellm.server.errors import APIError
from tessellm.server.models_config import ModelSpec

logger = logging.getLogger("tessellm.server.router")

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def load_error(name: str, exc: BaseException) -> APIError:
    """A model that could not be loaded: 400 for what its configuration got wrong (a bad
    path, an unknown argument), 503 for what went wrong while loading it (a worker died,
    out of memory)."""
    from tessellm.errors import TessellmError, WorkerError

    if isinstance(exc, APIError):
        return exc
    reason = " ".join(str(exc).split()) or type(exc).__name__
    config_error = isinstance(exc, TessellmError | ValueError)
    status = 400 if config_error and not isinstance(exc, WorkerError) else 503
    logger.error("the model %r could not be loaded: %s", name, reason)
    return APIError(
        status,
        f"the model {name!r} could not be loaded: {reason}",
        param="model",
        code="model_load_failed",
    )


def fetch_model(spec: ModelSpec) -> None:
    """Resolve (download where need be) a model and read its config, without loading it."""
    from tessellm import model_loader as ml
    from tessellm.plugins import get_plugins

    plugins = get_plugins()
    args = spec.args
    resolved = ml.resolve_model(plugins, args.model, args.cache_dir, args.revision)
    ml.weight_format(plugins, resolved).load_config(resolved.path)


def free_memory() -> None:
    gc.collect()  # the engine's reference cycles, so its tensors go now
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_bytes(engine: Any) -> int:
    """A loaded engine's weights + KV cache in bytes, where its model runner is in this
    process (0 otherwise: tensor-parallel workers, data-parallel replicas)."""
    runner = getattr(getattr(getattr(engine, "engine", None), "executor", None), "runner", None)
    model = getattr(runner, "model", None)
    if model is None:
        return 0
    from tessellm.model_loader import model_bytes

    return model_bytes(model) + int(runner.num_blocks) * int(runner.bytes_per_block())


def estimated_bytes(spec: ModelSpec) -> int:
    """Before a first load: the weights' size on disk (0 for a model not on local disk)."""
    path = Path(spec.args.model)
    try:
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES]
        else:
            return 0
        return sum(f.stat().st_size for f in files) * spec.data_parallel_size
    except OSError:
        return 0
