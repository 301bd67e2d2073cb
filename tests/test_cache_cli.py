"""The compile cache on disk: least recently used libraries go first, the cap holds, a
library in use stays, dead builds' partial files go; ``tessellm cache ls|prune`` show
and do it (no torch, no model: files only)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessellm.cli.app import build_app
from tessellm_cpu import cache_store

MIB = 1 << 20


def make_library(cache: Path, key: str, size: int, age_s: float, model: str = "m") -> Path:
    """A fake library of ``size`` bytes last used ``age_s`` seconds ago."""
    path = cache_store.compiled_dir(cache) / f"decode-{key}.pt2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    cache_store.write_sidecar(path, model, (1, 16) if key < "m" else (17, 64))
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


@pytest.fixture
def cache(tessellm_cache_dir: Path) -> Path:
    make_library(tessellm_cache_dir, "aaaa", 3 * MIB, age_s=300, model="smollm2-135m-instruct")
    make_library(tessellm_cache_dir, "bbbb", 2 * MIB, age_s=3600, model="/models/llama")
    make_library(tessellm_cache_dir, "zzzz", 1 * MIB, age_s=60, model="org/name")
    return tessellm_cache_dir


def keys(cache: Path) -> list[str]:
    return [e.key for e in cache_store.entries(cache)]


def cli(*args: str) -> str:
    result = CliRunner().invoke(build_app(), ["cache", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_entries_are_least_recently_used_first(cache):
    assert keys(cache) == ["bbbb", "aaaa", "zzzz"]
    entry = cache_store.entries(cache)[0]
    assert (entry.model, entry.batch_range) == ("/models/llama", (1, 16))
    assert entry.size > 2 * MIB  # the library and its sidecar
    # Loading a library touches it: it becomes the most recently used.
    cache_store.touch(entry.path)
    assert keys(cache) == ["aaaa", "zzzz", "bbbb"]


def test_prune_removes_oldest_until_under_the_cap(cache):
    removed = cache_store.prune(cache, limit=4 * MIB)
    assert [e.key for e in removed] == ["bbbb", "aaaa"]  # 6 MiB -> 1 MiB
    assert keys(cache) == ["zzzz"]
    assert not list(cache_store.compiled_dir(cache).glob("decode-bbbb*"))  # sidecar too


def test_prune_keeps_libraries_in_use(cache):
    oldest = cache_store.compiled_dir(cache) / "decode-bbbb.pt2"
    removed = cache_store.prune(cache, limit=MIB + MIB // 2, keep=frozenset({oldest}))
    assert [e.key for e in removed] == ["aaaa", "zzzz"]
    assert keys(cache) == ["bbbb"]


def test_cap_from_the_environment(cache, monkeypatch):
    monkeypatch.setenv(cache_store.MAX_BYTES_ENV, "5M")
    assert cache_store.max_bytes() == 5 * MIB
    assert [e.key for e in cache_store.prune(cache)] == ["bbbb"]
    monkeypatch.setenv(cache_store.MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="TESSELLM_COMPILE_CACHE_MAX_BYTES"):
        cache_store.max_bytes()
    monkeypatch.delenv(cache_store.MAX_BYTES_ENV)
    assert cache_store.max_bytes() == 2 << 30


def test_partial_files_of_dead_builds_go(cache):
    directory = cache_store.compiled_dir(cache)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_pid = int(dead.stdout)
    stale = directory / f"decode-cccc.{dead_pid}.partial.pt2"
    stale.write_bytes(b"\0" * MIB)
    building = directory / f"decode-dddd.{os.getpid()}.partial.pt2"  # a live build
    building.write_bytes(b"\0")
    assert "cccc" not in keys(cache) and "dddd" not in keys(cache)  # not libraries yet
    cache_store.prune(cache)
    assert not stale.exists() and building.exists()


def test_cache_ls_lists_model_range_size_and_last_use(cache):
    out = cli("ls").splitlines()
    assert out[0].split() == ["LAST", "USED", "SIZE", "BATCH", "LIBRARY", "MODEL"]
    rows = out[1:4]
    assert [r.split()[-1] for r in rows] == ["/models/llama", "smollm2-135m-instruct", "org/name"]
    assert "2.0 MiB" in rows[0] and " 1-16 " in rows[0]
    assert "1.0 MiB" in rows[2] and " 17-64 " in rows[2]
    assert out[4].startswith("3 libraries, 6.0 MiB of 2.0 GiB")


def test_cache_prune_to_a_size_and_all(cache, monkeypatch):
    assert "removed 1 libraries" in cli("prune", "--max-bytes", "5M")
    assert keys(cache) == ["aaaa", "zzzz"]
    monkeypatch.setenv(cache_store.MAX_BYTES_ENV, "2M")  # the default limit is the cap
    cli("prune")
    assert keys(cache) == ["zzzz"]
    out = cli("prune", "--all")
    assert "removed 1 libraries" in out and keys(cache) == []
    assert "no compiled libraries" in cli("ls")


def test_cache_prune_rejects_bad_arguments(cache):
    result = CliRunner().invoke(build_app(), ["cache", "prune", "--max-bytes", "big"])
    assert result.exit_code == 2 and "--max-bytes" in result.output
    result = CliRunner().invoke(build_app(), ["cache", "prune", "--all", "--max-bytes", "1G"])
    assert result.exit_code == 2
    assert keys(cache) == ["bbbb", "aaaa", "zzzz"]
