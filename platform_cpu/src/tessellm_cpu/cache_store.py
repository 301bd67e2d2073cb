"""The compiled-decode cache on disk: ``<cache>/compiled/``, bounded in bytes.

Each library is ``decode-<key>.pt2`` with a sidecar ``decode-<key>.json`` that says what
it is for (model, batch range, when built): ``tessellm cache ls`` reads the sidecars, the
runtime never does. A library's modification time is its last use: it is touched when a
process loads it, and pruning removes the least recently used libraries until the rest
fit the cap (``TESSELLM_COMPILE_CACHE_MAX_BYTES``, default 2 GiB).

Standard library only: ``tessellm cache`` imports this without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES_ENV = "TESSELLM_COMPILE_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
LIBRARY_GLOB = "decode-*.pt2"
# A build in progress writes decode-<key>.<pid>.partial.pt2 and renames it when done.
PARTIAL_SUFFIX = ".partial.pt2"
LOG_MAX_AGE_S = 7 * 86400
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def compiled_dir(cache_dir: Path) -> Path:
    return cache_dir / "compiled"


def parse_bytes(text: str) -> int:
    """``2147483648``, ``512M``, ``2G``, ``1.5GiB`` (binary units) as a byte count."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)].strip()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (e.g. 2147483648, 512M, 2G)") from None
    if value < 0:
        raise ValueError(f"a byte count cannot be negative: {text!r}")
    return int(value * _UNITS[unit])


def max_bytes() -> int:
    """The cache's cap: ``TESSELLM_COMPILE_CACHE_MAX_BYTES`` or 2 GiB."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        return parse_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"{MAX_BYTES_ENV}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached library."""

    path: Path
    size: int  # the library and its sidecar
    last_used: float  # seconds since the epoch
    model: str  # "?" for a library without a sidecar
    batch_range: tuple[int, int] | None

    @property
    def key(self) -> str:
        return self.path.stem.removeprefix("decode-")


def sidecar(library: Path) -> Path:
    return library.with_suffix(".json")


def write_sidecar(library: Path, model: str, batch_range: tuple[int, int], **facts: object) -> None:
    meta = {"model": model, "batch_range": list(batch_range), "built": time.time(), **facts}
    partial = library.with_name(f"{library.stem}.{os.getpid()}.json.partial")
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, sidecar(library))


def touch(library: Path) -> None:
    """Mark a library used now (pruning keeps recently used ones)."""
    with contextlib.suppress(OSError):
        os.utime(library)


def _read_entry(library: Path) -> Entry | None:
    try:
        stat = library.stat()
    except OSError:  # removed meanwhile
        return None
    size, model, batch_range = stat.st_size, "?", None
    try:
        side = sidecar(library)
        meta = json.loads(side.read_text())
        size += side.stat().st_size
        model = str(meta.get("model") or "?")
        low, high = meta["batch_range"]
        batch_range = (int(low), int(high))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return Entry(library, size, stat.st_mtime, model, batch_range)


def entries(cache_dir: Path) -> list[Entry]:
    """Every cached library, least recently used first."""
    found = (_read_entry(p) for p in compiled_dir(cache_dir).glob(LIBRARY_GLOB))
    libraries = [e for e in found if e is not None and not e.path.name.endswith(PARTIAL_SUFFIX)]
    return sorted(libraries, key=lambda e: (e.last_used, e.path.name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_leftovers(cache_dir: Path) -> list[Path]:
    """Partial files of builds whose process is gone (killed mid-write), and build logs
    (kept where a build failed) older than :data:`LOG_MAX_AGE_S`."""
    directory = compiled_dir(cache_dir)
    stale = []
    for path in directory.glob("decode-*.partial*"):
        pid = path.name.split(".")[1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            stale.append(path)
    now = time.time()
    for log in directory.glob("build-*.log"):
        with contextlib.suppress(OSError):
            if now - log.stat().st_mtime > LOG_MAX_AGE_S:
                stale.append(log)
    return stale


def _remove(entry: Entry) -> None:
    for path in (entry.path, sidecar(entry.path)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def prune(
    cache_dir: Path, limit: int | None = None, keep: frozenset[Path] = frozenset()
) -> list[Entry]:
    """Remove least recently used libraries until the rest take at most ``limit`` bytes
    (default :func:`max_bytes`); ``keep`` (libraries in use by the caller) stay whatever
    their age. Also removes partial files of builds that died. Returns what it removed."""
    limit = max_bytes() if limit is None else limit
    for path in _stale_leftovers(cache_dir):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    current = entries(cache_dir)
    total = sum(e.size for e in current)
    removed = []
    for entry in current:
        if total <= limit:
            break
        if entry.path in keep:
            continue
        _remove(entry)
        removed.append(entry)
        total -= entry.size
    return removed


def prune_all(cache_dir: Path) -> list[Entry]:
    """Remove every library and build log (builds in progress keep their partial files)."""
    removed = prune(cache_dir, limit=0)
    for log in compiled_dir(cache_dir).glob("build-*.log"):
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
    return removed
