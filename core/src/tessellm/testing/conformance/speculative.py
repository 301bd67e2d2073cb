"""Conformance of a speculative-decoding proposer: outputs never change, drafts are used."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tessellm.interfaces.speculative import Proposer
from tessellm.testing.conformance.result import Checker, CheckResult

# Prompts whose continuations a tiny random model tends to repeat, so that proposers that
# look back (n-grams) and draft models alike have something to propose.
REPEATING_PROMPTS: list[list[int]] = [
    [5, 17, 33, 8, 41] * 6,
    [90, 91, 92, 93] * 5 + [7, 8],
    list(range(40, 70)),
]
PARITY_MODES = ("batched", "one_at_a_time", "prefix_cache", "preemption")


def _proposer_class(checker: Checker, name: str) -> type | None:
    from tessellm.plugins import get_plugins

    try:
        cls = get_plugins().load("speculative_proposers", name)
    except Exception as exc:
        checker.crashed("loading the proposer", exc)
        return None
    if not (isinstance(cls, type) and issubclass(cls, Proposer)):
        checker.fail(f"registered target {cls!r} is not a Proposer subclass")
        return None
    return cls


def _token_ids(outputs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def check_speculative_proposer(
    name: str,
    model_dir: Path | str,
    config: dict[str, Any] | None = None,
    max_tokens: int = 24,
    **engine_args: Any,
) -> CheckResult:
    """Check the proposer registered as ``name`` with the tiny model at ``model_dir``.

    ``config`` adds ``speculative_config`` fields (``num_speculative_tokens``, ``model``
    ...) to ``{"method": name}``; ``engine_args`` go to every engine. Checked: greedy tokens
    with speculation equal HF transformers' fp32 greedy tokens batched, one at a time,
    with prefix-cache hits and under preemption (``tessellm.testing.assert_greedy_parity``'s
    modes); on prompts that repeat, the proposer proposed drafts, no more than
    ``num_speculative_tokens`` per step, and the engine's counters add up; sampled
    requests with a seed give the same tokens twice and equal-length outputs within
    ``max_tokens``; the engine frees every KV block afterwards."""
    from tessellm import LLM, SamplingParams
    from tessellm.testing.parity import greedy_parity_failures

    checker = Checker(name, "speculative_proposer")
    if _proposer_class(checker, name) is None:
        return checker.finish()
    spec = {"method": name, **(config or {})}
    k = int(spec.get("num_speculative_tokens", 3))
    try:
        failures = greedy_parity_failures(
            model_dir,
            REPEATING_PROMPTS,
            max_tokens,
            modes=PARITY_MODES,
            speculative_config=spec,
            **engine_args,
        )
    except Exception as exc:
        checker.crashed("[parity] generating", exc)
        failures = []
    for failure in failures:
        checker.fail(f"[parity] {failure}")
    checker.result.checked.extend(f"greedy parity ({mode})" for mode in PARITY_MODES)

    with tempfile.TemporaryDirectory() as cache:
        try:
            llm = LLM(
                model=str(model_dir),
                dtype="float32",
                download_dir=cache,
                speculative_config=spec,
                **engine_args,
            )
        except Exception as exc:
            checker.crashed("[engine] building", exc)
            return checker.finish()
        prompts = [{"prompt_token_ids": p} for p in REPEATING_PROMPTS]
        try:
            greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            llm.generate(prompts, greedy, use_tqdm=False)
            stats = llm.engine.stats()
            drafts = stats["spec_decode_num_drafts"]
            proposed = stats["spec_decode_num_draft_tokens"]
            accepted = stats["spec_decode_num_accepted_tokens"]
            checker.expect(proposed > 0, "[engine] no draft token was proposed")
            checker.expect(
                proposed <= k * drafts,
                f"[engine] {proposed} drafts in {drafts} verified steps: more than k={k} a step",
            )
            checker.expect(0 <= accepted <= proposed, f"[engine] {accepted} accepted of {proposed}")
            checker.result.checked.append("drafts proposed")

            sampled = SamplingParams(
                temperature=0.8, seed=7, max_tokens=max_tokens, ignore_eos=True
            )
            first = _token_ids(llm.generate(prompts, sampled, use_tqdm=False))
            again = _token_ids(llm.generate(prompts, sampled, use_tqdm=False))
            checker.expect(first == again, "[sampled] a seeded request gave different tokens")
            checker.expect(
                all(len(t) == max_tokens for t in first),
                "[sampled] outputs are not max_tokens long (ignore_eos)",
            )
            checker.result.checked.append("seeded sampling reproducible")
            usage = llm.engine.stats()["kv_cache_usage"]
            checker.expect(usage == 0.0, f"[engine] {usage:.0%} of KV blocks still held")
        except Exception as exc:
            checker.crashed("[engine] generating", exc)
        finally:
            llm.engine.shutdown()
    return checker.finish()
