"""``tessellm cache ls|prune``: the compiled CPU decode libraries in tessellm's cache.

The libraries (``<cache>/compiled/``, ``TESSELLM_CACHE`` or ``~/.cache/tessellm``) are
the CPU platform's (``tessellm_cpu.cache_store``, standard library only: these commands
import no torch). The cache prunes itself to its cap after each build; ``prune`` does it
now, to the cap, to ``--max-bytes``, or entirely.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Annotated

import typer

from tessellm.cli.common import fail

cache_app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels cut option names at 80 columns
    help="List or prune the compiled CPU decode libraries in tessellm's cache.",
    no_args_is_help=True,
)
USER_ERROR = 2


def _store() -> ModuleType:
    try:
        from tessellm_cpu import cache_store
    except ImportError:
        fail(
            "the compile cache belongs to the CPU platform, which is not installed "
            "(pip install tessellm-cpu)",
            USER_ERROR,
        )
    return cache_store


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cap(store: ModuleType) -> int:
    try:
        return store.max_bytes()
    except ValueError as exc:
        fail(str(exc), USER_ERROR)


@cache_app.command("ls")
def ls() -> None:
    """List cached libraries, least recently used first (the first to be pruned)."""
    from tessellm.config import default_cache_dir

    store = _store()
    root = default_cache_dir()
    entries = store.entries(root)
    cap = _cap(store)
    directory = store.compiled_dir(root)
    if not entries:
        typer.echo(f"no compiled libraries in {directory} (cap {_size(cap)})")
        return
    typer.echo(f"{'LAST USED':<17} {'SIZE':>9} {'BATCH':>6}  {'LIBRARY':<16} MODEL")
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        batch = "?" if entry.batch_range is None else "{}-{}".format(*entry.batch_range)
        key = entry.key[:16]
        typer.echo(f"{used:<17} {_size(entry.size):>9} {batch:>6}  {key:<16} {entry.model}")
    total = sum(e.size for e in entries)
    typer.echo(
        f"{len(entries)} libraries, {_size(total)} of {_size(cap)} "
        f"({store.MAX_BYTES_ENV}) in {directory}"
    )


@cache_app.command("prune")
def prune(
    max_bytes: Annotated[
        str | None,
        typer.Option(
            "--max-bytes",
            help="Keep at most this much, least recently used out first (e.g. 500M, 2G). "
            "Default: the cap (TESSELLM_COMPILE_CACHE_MAX_BYTES, else 2 GiB).",
        ),
    ] = None,
    remove_all: Annotated[
        bool, typer.Option("--all", help="Remove every library (and kept build logs).")
    ] = False,
) -> None:
    """Remove least recently used libraries until the rest fit the cap."""
    from tessellm.config import default_cache_dir

    store = _store()
    if remove_all and max_bytes is not None:
        fail("--all and --max-bytes exclude each other", USER_ERROR)
    root = default_cache_dir()
    if remove_all:
        removed = store.prune_all(root)
    else:
        try:
            limit = _cap(store) if max_bytes is None else store.parse_bytes(max_bytes)
        except ValueError as exc:
            fail(f"--max-bytes: {exc}", USER_ERROR)
        removed = store.prune(root, limit)
    for entry in removed:
        batch = "?" if entry.batch_range is None else "{}-{}".format(*entry.batch_range)
        typer.echo(f"removed {entry.key[:16]} ({_size(entry.size)}, {batch}, {entry.model})")
    left = store.entries(root)
    typer.echo(
        f"removed {len(removed)} libraries ({_size(sum(e.size for e in removed))}); "
        f"{len(left)} left ({_size(sum(e.size for e in left))})"
    )
