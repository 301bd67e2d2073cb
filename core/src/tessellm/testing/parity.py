"""Greedy parity with HF transformers (fp32) across the engine's batching paths."""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tessellm.testing.models import TEST_PROMPTS
from tessellm.testing.reference import encode_prompts, hf_continuation

MODES: tuple[str, ...] = ("batched", "one_at_a_time", "prefix_cache", "preemption")
# Block sizes tried, largest first, for the preemption run when the caller names none.
PREEMPTION_BLOCK_SIZES = (16, 8, 4)


@contextlib.contextmanager
def engine_environment(cache_dir: Path) -> Iterator[None]:
    """Engines in tests run decode steps eagerly (compiling one per tiny model costs a
    C++ build) and write compiled artefacts under ``cache_dir``, never ``~/.cache``,
    unless the caller already set these variables."""
    defaults = {"TESSELLM_CPU_COMPILE": "0", "TESSELLM_CACHE": str(cache_dir)}
    added = [name for name in defaults if name not in os.environ]
    for name in added:
        os.environ[name] = defaults[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def hf_references(
    model_dir: Path | str,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    load_kwargs: dict[str, Any],
) -> list[list[int]]:
    """``hf_greedy`` of every prompt through one loaded model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **load_kwargs
    ).eval()
    try:
        return [hf_continuation(model, ids, max_new_tokens) for ids in prompt_ids]
    finally:
        del model
        gc.collect()


def first_difference(got: Sequence[int], expected: Sequence[int]) -> int:
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return i
    return min(len(got), len(expected))


def describe_mismatches(
    mode: str,
    prompt_ids: Sequence[Sequence[int]],
    got: Sequence[Sequence[int]],
    expected: Sequence[Sequence[int]],
) -> list[str]:
    failures = []
    for i, (ids, g, e) in enumerate(zip(prompt_ids, got, expected, strict=True)):
        if list(g) != list(e):
            failures.append(
                f"{mode}: prompt {i} ({len(ids)} tokens, starting {list(ids[:8])}): first "
                f"difference at generated position {first_difference(g, e)}\n"
                f"  tessellm: {list(g)}\n  HF:       {list(e)}"
            )
    return failures


def shared_prefix(prompt_ids: Sequence[Sequence[int]], length: int) -> list[int]:
    """``length`` tokens taken from the prompts themselves (so every id is in the vocab)."""
    pool = [t for ids in prompt_ids for t in ids]
    return [pool[i % len(pool)] for i in range(length)]


def preemption_layout(
    prompt_lengths: Sequence[int], max_tokens: int, block_sizes: Sequence[int]
) -> tuple[int, int] | None:
    """``(block_size, num_blocks)`` for a KV pool that admits every prompt at once (so the
    batch starts together), holds the longest request alone (so none is cut short), yet
    cannot hold every request at full length: a running request must be preempted.
    None when no block size in ``block_sizes`` forces that."""
    for block_size in block_sizes:

        def blocks(tokens: int, bs: int = block_size) -> int:
            return -(-tokens // bs)

        admitted = sum(blocks(n) for n in prompt_lengths)
        # The last sampled token is never written back: a request's KV peaks one short.
        peak = sum(blocks(n + max_tokens - 1) for n in prompt_lengths)
        num_blocks = max(admitted, max(blocks(n + max_tokens) for n in prompt_lengths) + 1)
        if peak > num_blocks:
            return block_size, num_blocks
    return None


def default_block_size() -> int:
    import dataclasses

    from tessellm.config import EngineArgs

    return next(f.default for f in dataclasses.fields(EngineArgs) if f.name == "block_size")


class _Run:
    """One engine per mode, shut down before the next is built."""

    def __init__(self, model_dir: Path | str, cache_dir: Path, engine_args: dict[str, Any]):
        self.base = {
            "model": str(model_dir),
            "dtype": "float32",
            "seed": 0,
            "download_dir": str(cache_dir),
            **engine_args,
        }

    @contextlib.contextmanager
    def engine(self, **overrides: Any) -> Iterator[Any]:
        from tessellm import LLM

        llm = LLM(**{**self.base, **overrides})
        try:
            yield llm
        finally:
            llm.engine.shutdown()
            del llm
            gc.collect()


def _generate(llm: Any, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    from tessellm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def greedy_parity_failures(
    model_dir: Path | str,
    prompts: Sequence[str | Sequence[int]] | None = None,
    max_tokens: int = 24,
    *,
    hf_load_kwargs: dict[str, Any] | None = None,
    modes: Sequence[str] = MODES,
    **engine_args: Any,
) -> list[str]:
    """What ``assert_greedy_parity`` checks, as a list of failure messages (empty: equal)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown parity mode(s) {unknown}; choose from {list(MODES)}")
    prompt_ids = encode_prompts(model_dir, list(prompts) if prompts else TEST_PROMPTS)
    # Two whole KV blocks and a partial third: hits on full blocks, a tail computed anew.
    prefix_len = 2 * engine_args.get("block_size", default_block_size()) + 3
    prefixed = [shared_prefix(prompt_ids, prefix_len) + ids for ids in prompt_ids]
    layout = None
    if "preemption" in modes:
        sizes = [engine_args["block_size"]] if "block_size" in engine_args else None
        layout = preemption_layout(
            [len(ids) for ids in prompt_ids], max_tokens, sizes or PREEMPTION_BLOCK_SIZES
        )
        if layout is None:
            raise ValueError(
                "the preemption mode cannot force a preemption with these prompts: give at "
                "least two prompts and enough max_tokens to outgrow a KV block"
            )
    load_kwargs = {"attn_implementation": "eager"} if hf_load_kwargs is None else hf_load_kwargs
    wanted = prompt_ids + (prefixed if "prefix_cache" in modes else [])
    references = hf_references(model_dir, wanted, max_tokens, load_kwargs)
    expected, expected_prefixed = references[: len(prompt_ids)], references[len(prompt_ids) :]

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tessellm-parity-") as tmp:
        run = _Run(model_dir, Path(tmp), engine_args)
        with engine_environment(Path(tmp)):
            if "batched" in modes:
                with run.engine() as llm:
                    got = _generate(llm, prompt_ids, max_tokens)
                failures += describe_mismatches("batched", prompt_ids, got, expected)
            if "one_at_a_time" in modes:
                with run.engine() as llm:
                    got = [_generate(llm, [ids], max_tokens)[0] for ids in prompt_ids]
                failures += describe_mismatches("one_at_a_time", prompt_ids, got, expected)
            if "prefix_cache" in modes:
                failures += _prefix_cache_mode(
                    run, prefixed, expected_prefixed, max_tokens, prefix_len
                )
            if "preemption" in modes:
                assert layout is not None
                failures += _preemption_mode(run, prompt_ids, expected, max_tokens, layout)
    return failures


def _prefix_cache_mode(
    run: _Run,
    prefixed: list[list[int]],
    expected: list[list[int]],
    max_tokens: int,
    prefix_len: int,
) -> list[str]:
    """The first prompt alone fills the cache with the shared prefix; the others, sent
    together after it, must find it there."""
    with run.engine(enable_prefix_caching=True) as llm:
        got = _generate(llm, prefixed[:1], max_tokens)
        got += _generate(llm, prefixed[1:], max_tokens) if len(prefixed) > 1 else []
        hits = llm.engine.stats().get("prefix_cache_hit_tokens")
        # Models with recurrent layers keep no prefix cache: their tokens are still checked.
        caching = llm.engine.kv_cache_manager.enable_prefix_caching
    failures = describe_mismatches("prefix_cache", prefixed, got, expected)
    if len(prefixed) > 1 and caching and not hits:
        failures.append(
            f"prefix_cache: {len(prefixed)} prompts sharing a {prefix_len}-token "
            f"start, yet the engine reports prefix_cache_hit_tokens={hits!r}"
        )
    return failures


def _preemption_mode(
    run: _Run,
    prompt_ids: list[list[int]],
    expected: list[list[int]],
    max_tokens: int,
    layout: tuple[int, int],
) -> list[str]:
    block_size, num_blocks = layout
    # The pool is sized for one block table: windowed layers in tables of their own would
    # split it (tests/test_cachespec_windows.py preempts those layouts).
    one_table = run.base.get("disable_hybrid_kv_cache_manager", True)
    with run.engine(
        block_size=block_size,
        num_gpu_blocks_override=num_blocks,
        disable_hybrid_kv_cache_manager=one_table,
    ) as llm:
        got = _generate(llm, prompt_ids, max_tokens)
        preemptions = llm.engine.stats().get("num_preemptions")
    mode = f"preemption ({num_blocks} KV blocks of {block_size})"
    failures = describe_mismatches(mode, prompt_ids, got, expected)
    if not preemptions:
        failures.append(f"{mode}: the engine reports num_preemptions={preemptions!r}, not > 0")
    return failures


def assert_greedy_parity(
    model_dir: Path | str,
    prompts: Sequence[str | Sequence[int]] | None = None,
    max_tokens: int = 24,
    *,
    hf_load_kwargs: dict[str, Any] | None = None,
    modes: Sequence[str] = MODES,
    **engine_args: Any,
) -> None:
    """tessellm's greedy tokens equal HF transformers' fp32 greedy tokens, in each mode:

    - ``batched``: every prompt in one ``generate`` call;
    - ``one_at_a_time``: each prompt alone;
    - ``prefix_cache``: every prompt behind a shared start of two blocks and more, the
      first alone and then the rest, asserting the engine reports prefix-cache hits;
    - ``preemption``: a KV pool too small for the batch at full length, asserting the
      engine reports preemptions.

    ``prompts`` are text (tokenized with the checkpoint's tokenizer) or token-id lists
    (default ``TEST_PROMPTS``). ``hf_load_kwargs`` go to HF's ``from_pretrained``
    (default ``attn_implementation="eager"``). ``engine_args`` are ``EngineArgs`` fields
    (``attention_backend=``, ``device=``, ``block_size=`` ...) on top of
    ``dtype="float32", seed=0`` and a temporary ``download_dir``. Raises
    ``AssertionError`` naming the mode, the prompt, the first differing position and
    both token lists."""
    failures = greedy_parity_failures(
        model_dir,
        prompts,
        max_tokens,
        hf_load_kwargs=hf_load_kwargs,
        modes=modes,
        **engine_args,
    )
    if failures:
        raise AssertionError(
            f"greedy tokens differ from HF transformers for {model_dir}:\n" + "\n".join(failures)
        )
