"""``check_model_family``: a registered model family's greedy tokens against HF's."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tessellm.testing.conformance.result import Checker, CheckResult
from tessellm.testing.models import TEST_PROMPTS

# A short prompt, a long one and a mid-length one; few tokens keep the check fast.
FAMILY_PROMPTS = [TEST_PROMPTS[0], TEST_PROMPTS[2], TEST_PROMPTS[6]]
FAMILY_MAX_TOKENS = 8


def check_model_family(
    architecture: str,
    *,
    prompts: Sequence[str | Sequence[int]] | None = None,
    max_tokens: int = FAMILY_MAX_TOKENS,
    config_overrides: dict[str, Any] | None = None,
    **engine_args: Any,
) -> CheckResult:
    """Check the model family serving ``architecture``: a tiny random checkpoint
    (``tiny_model(architecture, ..., **config_overrides)``) must give HF transformers'
    fp32 greedy tokens in every mode of ``assert_greedy_parity`` (three prompts, 8 new
    tokens by default). ``engine_args`` go to the engines. Skipped when transformers
    does not know the architecture (there is no reference) or cannot build it tiny."""
    from tessellm.plugins import get_plugins
    from tessellm.testing.models import UnknownArchitectureError, tiny_model
    from tessellm.testing.parity import greedy_parity_failures

    checker = Checker(architecture, "model_family")
    plugins = get_plugins()
    registration = plugins.get("models", architecture)
    if registration is None:
        checker.fail(plugins.missing_message("models", architecture))
        return checker.finish()
    from tessellm.interfaces.pooling import is_encoder_class

    try:
        encoder = is_encoder_class(registration.load())
    except Exception:  # reported where the model is built, below
        encoder = False
    if encoder:  # pooled, not generating: sentence-transformers is the reference
        from tessellm.testing.conformance.pooling import check_encoder_family

        return check_encoder_family(
            architecture, registration.plugin, config_overrides, **engine_args
        )
    with tempfile.TemporaryDirectory(prefix="tessellm-family-") as tmp:
        try:
            path = tiny_model(architecture, Path(tmp) / "model", **(config_overrides or {}))
        except UnknownArchitectureError as exc:
            return checker.skip(f"{exc}: there is no reference to compare with")
        except Exception as exc:
            return checker.skip(
                f"tessellm.testing cannot build a tiny {architecture} from transformers' "
                f"defaults ({type(exc).__name__}: {exc}); pass config_overrides"
            )
        try:
            failures = greedy_parity_failures(
                path, prompts or FAMILY_PROMPTS, max_tokens, **engine_args
            )
        except Exception as exc:
            checker.crashed(f"serving the tiny {architecture} (plugin {registration.plugin})", exc)
            return checker.finish()
    for failure in failures:
        checker.fail(failure)
    checker.result.checked.append(
        f"{architecture} from plugin {registration.plugin}: batched, one at a time, "
        f"prefix-cache hits, preemption; {max_tokens} tokens"
    )
    return checker.finish()
