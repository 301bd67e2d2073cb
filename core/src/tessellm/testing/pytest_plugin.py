"""The ``tessellm`` pytest plugin (entry point ``pytest11``): fixtures for plugin tests.

pytest imports this module in every run where tessellm is installed, so it imports
nothing heavy at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Engine-wide caches a test must not share with the user's ~/.cache.
CACHE_ENV = ("TESSELLM_CACHE",)


def pytest_configure(config: pytest.Config) -> None:
    """A test run keeps tessellm's cache (fetched models, converted GGUFs, compiled decode
    libraries) out of the user's ~/.cache/tessellm: in the project's pytest cache
    (``.pytest_cache/d/tessellm``, kept between runs, so models are fetched once;
    ``pytest --cache-clear`` empties it), or a temporary folder without one. A
    ``TESSELLM_CACHE`` already set is kept. Subprocesses (CLI, servers) inherit it."""
    import os

    if os.environ.get("TESSELLM_CACHE"):
        return
    store = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if store is not None:
        path = store.mkdir("tessellm")
    else:
        import shutil
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="tessellm-test-cache-"))
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    os.environ["TESSELLM_CACHE"] = str(path)


@pytest.fixture
def tessellm_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh directory that tessellm uses as its cache for the test (``TESSELLM_CACHE``
    points there, so compiled decode libraries and converted checkpoints land in it);
    pass it on as ``download_dir=`` to engines that fetch models."""
    path = tmp_path_factory.mktemp("tessellm-cache")
    with pytest.MonkeyPatch.context() as patch:
        for name in CACHE_ENV:
            patch.setenv(name, str(path))
        yield path


@pytest.fixture
def tiny_model_factory(tmp_path: Path) -> Callable[..., Path]:
    """``tiny_model_factory("LlamaForCausalLM", **config_overrides) -> Path``: a tiny
    random checkpoint (see ``tessellm.testing.tiny_model``) in this test's ``tmp_path``;
    ``seed=`` chooses the weights. Each call writes a new directory."""
    counter = iter(range(1_000_000))

    def make(architecture: str, *, seed: int = 0, **config_overrides: Any) -> Path:
        from tessellm.testing.models import tiny_model

        path = tmp_path / f"{architecture}-{next(counter)}"
        return tiny_model(architecture, path, seed=seed, **config_overrides)

    return make
