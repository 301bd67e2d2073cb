"""The routes' tokenizer work (encode, decode, chat templates) on a thread of its own.

As engine commands, a text prompt waited for the step in flight to end before it was
tokenized, and its add then for the next one: it reached the scheduler up to two steps
after it arrived (~100-240 ms at 4 req/s on two cores, bench/RESULTS.md 2026-12-06). On
this thread it waits for neither; only the add waits for the step in flight.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TokenizerFront:
    """What ``front_call(fn)`` hands to ``fn``: a tokenizer of the routes' own.

    A copy of the engine's: the engine thread detokenizes with its tokenizer while this
    thread encodes and renders templates, and an HF fast tokenizer used from two threads
    at once can fail ("Already borrowed") when one call changes its settings.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)


class FrontThread:
    """One thread running ``fn(TokenizerFront)`` calls in order, off the event loop."""

    def __init__(self, tokenizer: Any) -> None:
        self._source = tokenizer
        self._front: TokenizerFront | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessellm-front")

    async def call(self, fn: Callable[[TokenizerFront], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, fn)

    def _run(self, fn: Callable[[TokenizerFront], T]) -> T:
        if self._front is None:  # here, not at start: the copy takes ~0.1 s
            self._front = TokenizerFront(self._source)
        return fn(self._front)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)
