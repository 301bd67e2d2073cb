"""A model given as a local directory or file."""

from __future__ import annotations

from pathlib import Path

from tessellm.interfaces.weights import ModelSource


class LocalPathSource(ModelSource):
    name = "local"

    def matches(self, model: str) -> bool:
        return Path(model).expanduser().exists()

    def resolve(self, model: str, cache_dir: Path) -> Path:
        return Path(model).expanduser().resolve()
