"""``check_model_family`` for an encoder family: embeddings against sentence-transformers'."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from tessellm.testing.conformance.result import Checker, CheckResult

# CLS and mean together: the first token's state and every token's count.
ENCODER_POOLING = ("cls", "mean")


def check_encoder_family(
    architecture: str, plugin: str, config_overrides: dict[str, Any] | None, **engine_args: Any
) -> CheckResult:
    """A tiny random ``architecture`` checkpoint saved for sentence-transformers (CLS and
    mean pooling, normalised) must embed the test sentences as sentence-transformers'
    ``encode`` does (cosine similarity >= 0.9999), batched and one at a time, from the
    same token ids. Skipped without sentence-transformers or where transformers cannot
    build the encoder tiny."""
    from tessellm.testing.embedding import embedding_parity_failures, tiny_embedding_model
    from tessellm.testing.models import UnknownArchitectureError

    checker = Checker(architecture, "model_family")
    if importlib.util.find_spec("sentence_transformers") is None:
        return checker.skip(
            "sentence-transformers is not installed: it is the reference for pooling models"
        )
    with tempfile.TemporaryDirectory(prefix="tessellm-encoder-") as tmp:
        try:
            path = tiny_embedding_model(
                architecture,
                Path(tmp) / "model",
                pooling=ENCODER_POOLING,
                **(config_overrides or {}),
            )
        except UnknownArchitectureError as exc:
            return checker.skip(f"{exc}: there is no reference to compare with")
        except Exception as exc:
            return checker.skip(
                f"tessellm.testing cannot build a tiny {architecture} encoder "
                f"({type(exc).__name__}: {exc}); pass config_overrides"
            )
        try:
            failures = embedding_parity_failures(path, **engine_args)
        except Exception as exc:
            checker.crashed(f"embedding with the tiny {architecture} (plugin {plugin})", exc)
            return checker.finish()
    for failure in failures:
        checker.fail(failure)
    checker.result.checked.append(
        f"{architecture} from plugin {plugin}: embeddings equal sentence-transformers' "
        "(CLS + mean pooling, normalised), batched and one at a time"
    )
    return checker.finish()
