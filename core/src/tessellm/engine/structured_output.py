"""Structured outputs in the engine: grammars compiled off the step loop, requests parked
until theirs is ready, one matcher per sequence, bitmasks filled before each launch and
matchers advanced after each update.

A request with ``structured_outputs`` names a grammar backend (its own ``backend``, else
the engine's ``structured_outputs_backend``; ``"auto"`` is xgrammar, else llguidance, else
the first registered). Its spec is compiled by that backend in a small thread pool; the
futures are cached by (backend, spec) in a bounded LRU, so a schema used again is ready at
once. Until its grammar is compiled the request is parked: added to the output processor
(abort works) but not to the scheduler, so it never holds a batch slot or KV blocks while
others run. Each ``step()`` starts by moving requests whose grammar is ready into the
scheduler with a fresh matcher per sample; a failed compile finishes the request with its
``InvalidRequestError``.

Before a plan is launched each constrained sampling sequence gets ``token_bitmask``, a host
row its matcher fills (rows are reused from step to step); the sampler applies it on the
device. After the
scheduler appends a step's tokens, each is fed to its matcher, before the next step is
scheduled (its bitmask depends on that token): so a step with a constrained sampling
sequence is scheduled ahead only where its sampling can wait for its bitmasks
(``structured_steps``). A matcher that ends (the grammar complete, an EOS taken
under ``ignore_eos``) finishes its request as stopped; a matcher or backend that raises,
or a token the grammar refuses (e.g. ``min_tokens`` forbidding the only token it allows),
fails that request alone. Preemption keeps a request's output tokens (its KV is
recomputed), so its matcher stays valid.

Choosing the backend and compiling (thread-safe, nothing of requests) is
``engine/grammar_compiler.py``'s ``GrammarCompiler``, which the manager owns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tessellm.config import EngineArgs
from tessellm.engine.grammar_compiler import CACHE_SIZE, COMPILE_WORKERS, GrammarCompiler
from tessellm.engine.output_processor import OutputProcessor
from tessellm.engine.step_recovery import RequestFailedError
from tessellm.errors import InvalidRequestError
from tessellm.interfaces.request import Request
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput
from tessellm.interfaces.structured_output import (
    CompiledGrammar,
    GrammarMatcher,
    bitmask_words,
)
from tessellm.plugins import PluginSet
from tessellm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# A request whose grammar is not compiled by then fails (a 400): a pathological schema
# must not park a request forever. The compile itself cannot be stopped; it finishes in
# its worker and stays cached.
COMPILE_TIMEOUT_S = 60.0


def compile_timeout_error(seconds: float) -> InvalidRequestError:
    return InvalidRequestError(
        f"structured outputs: the grammar did not compile within {seconds:g} s; simplify the schema"
    )


def _fill_by_class(matchers: list[GrammarMatcher], buffer: torch.Tensor) -> dict[int, Exception]:
    """Fill ``buffer[i]`` for each ``matchers[i]``, one batched call per matcher class;
    the rows whose matcher raised, with the error."""
    first = type(matchers[0])
    by_class: dict[type[GrammarMatcher], list[int]] = {}
    if all(type(m) is first for m in matchers):  # one backend: the usual step
        by_class[first] = list(range(len(matchers)))
    else:
        for row, matcher in enumerate(matchers):
            by_class.setdefault(type(matcher), []).append(row)
    errors: dict[int, Exception] = {}
    for cls, rows in by_class.items():
        whole = len(rows) == len(matchers)
        target = buffer if whole else torch.empty(len(rows), buffer.shape[1], dtype=buffer.dtype)
        try:
            cls.fill_bitmasks([matchers[r] for r in rows], target)
        except Exception:
            for i, row in enumerate(rows):  # which one raised: fill them one at a time
                try:
                    matchers[row].fill_bitmask(target, i)
                except Exception as exc:
                    errors[row] = exc
        if not whole:
            buffer[rows] = target
    return errors


def _ended(matcher: GrammarMatcher) -> bool:
    try:
        return matcher.is_terminated()
    except Exception:
        return True  # its next fill or accept would raise: the request is failing anyway


@dataclass(slots=True)
class Parked:
    """A request waiting for its grammar: its samples, not yet given to the scheduler."""

    parent_id: str
    children: list[Request]
    grammar: Future[CompiledGrammar]
    deadline: float  # time.monotonic() after which the request fails


class StructuredOutputManager:
    """The engine's structured-output state (see the module docstring).

    ``submit`` is thread-safe (the async front calls it from the event loop to answer a
    bad schema with a 400 before adding the request); everything else runs on the engine
    thread.
    """

    def __init__(
        self,
        plugins: PluginSet,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        args: EngineArgs,
        cache_size: int = CACHE_SIZE,
        workers: int = COMPILE_WORKERS,
    ) -> None:
        self.compiler = GrammarCompiler(
            plugins,
            tokenizer,
            vocab_size,
            eos_token_ids,
            args.structured_outputs_backend,
            cache_size,
            workers,
        )
        self.vocab_size = vocab_size
        self.compile_timeout_s = COMPILE_TIMEOUT_S
        self.parked: list[Parked] = []
        self.matchers: dict[str, GrammarMatcher] = {}
        # Requests to fail at the next update: a matcher raised while filling a bitmask.
        self.failed: dict[str, Exception] = {}
        self._buffer = torch.empty(0, bitmask_words(vocab_size), dtype=torch.int32)
        self._rows: tuple[torch.Tensor, ...] = ()
        self._firsts: dict[int, torch.Tensor] = {}  # count -> the buffer's first rows
        # A step scheduled ahead whose sampling waits for its bitmasks (``defer_bitmasks``).
        self.deferred: tuple[SchedulerOutput, Any, Any] | None = None

    def backend_name(self, so: StructuredOutputsParams) -> str:
        """The registered backend that compiles ``so`` (``InvalidRequestError`` if none)."""
        return self.compiler.backend_name(so)

    def submit(self, so: StructuredOutputsParams) -> Future[CompiledGrammar]:
        """The compile of ``so``'s grammar (``GrammarCompiler.submit``): thread-safe."""
        return self.compiler.submit(so)

    # -- requests waiting for their grammar ---------------------------------------------
    def add(
        self, parent_id: str, children: list[Request], grammar: Future[CompiledGrammar]
    ) -> bool:
        """Track ``children``; ``True`` if they may go to the scheduler now (the grammar
        is compiled: each got its matcher), ``False`` if they are parked."""
        if grammar.done() and not grammar.cancelled() and grammar.exception() is None:
            try:
                self._start(children, grammar.result())
                return True
            except Exception:
                pass  # parked: the next step fails it with the matcher's error
        deadline = time.monotonic() + self.compile_timeout_s
        self.parked.append(Parked(parent_id, children, grammar, deadline))
        return False

    def _start(self, children: list[Request], grammar: CompiledGrammar) -> None:
        for child in children:
            self.matchers[child.request_id] = grammar.new_matcher()

    def ready(self) -> tuple[list[Request], dict[str, Exception]]:
        """Parked requests whose compile is done: the samples to schedule (each with its
        matcher), and the parent ids whose compile failed, with the error."""
        if not self.parked:
            return [], {}
        start: list[Request] = []
        failed: dict[str, Exception] = {}
        still: list[Parked] = []
        now = time.monotonic()
        for parked in self.parked:
            if not parked.grammar.done():
                if now > parked.deadline:
                    failed[parked.parent_id] = compile_timeout_error(self.compile_timeout_s)
                else:
                    still.append(parked)
                continue
            grammar = parked.grammar
            error = (
                RequestFailedError("the grammar's compile was cancelled")
                if grammar.cancelled()
                else grammar.exception()
            )
            if error is None:
                try:
                    self._start(parked.children, grammar.result())
                except Exception as exc:
                    error = RequestFailedError(f"the grammar's matcher failed: {exc}")
                else:
                    start.extend(parked.children)
                    continue
            failed[parked.parent_id] = error
        self.parked = still
        return start, failed

    def wait(self, timeout: float) -> None:
        """Block until some parked request's grammar is done, at most ``timeout`` s."""
        if self.parked:
            wait([p.grammar for p in self.parked], timeout, FIRST_COMPLETED)

    # -- the step ------------------------------------------------------------------------
    def fill_bitmasks(self, plan: SchedulerOutput, scheduled_ahead: bool = False) -> None:
        """Give each constrained sampling seq of ``plan`` its row of allowed tokens.

        The rows are views of one buffer, reused from step to step (a step's rows are read
        when it samples, before the next step is filled). Matchers of one class fill their
        rows in one call (``GrammarMatcher.fill_bitmasks``: a backend may spread them over
        threads); a class whose call raises is filled again one matcher at a time, so the
        error fails only the request whose matcher raised.

        ``scheduled_ahead``: ``plan`` was scheduled before the last tokens were known, so
        it may hold requests that those tokens ended (a matcher terminated) or failed:
        their token will be dropped, and their matchers are not asked."""
        if not self.matchers:
            return
        seqs: list[ScheduledSeq] = []
        matchers: list[GrammarMatcher] = []
        by_id = self.matchers
        failed = self.failed
        for seq in plan.seqs:
            if not seq.sample:
                continue
            matcher = by_id.get(seq.request_id)
            if matcher is None:
                continue
            if scheduled_ahead and (seq.request_id in failed or _ended(matcher)):
                seq.token_bitmask = None
                continue
            seqs.append(seq)
            matchers.append(matcher)
        if not seqs:
            return
        buffer, rows = self._bitmask_rows(len(seqs))
        errors = _fill_by_class(matchers, buffer)
        # An empty row is one whose words OR to 0 (as int64: half the elements); numpy,
        # since torch's reduction would wake its thread pool for 64 small rows.
        words = buffer.numpy()
        if words.shape[1] % 2 == 0:
            words = words.view(np.int64)
        some = np.bitwise_or.reduce(words, axis=1)
        if not errors and some.all():
            for seq, row in zip(seqs, rows, strict=False):
                seq.token_bitmask = row
            return
        empty = set(np.flatnonzero(some == 0).tolist())
        for row, seq in enumerate(seqs):
            seq.token_bitmask = None  # unconstrained this step if it fails below
            if row in errors:
                exc = errors[row]
                failed[seq.request_id] = RequestFailedError(
                    f"the grammar matcher failed: {type(exc).__name__}: {exc}"
                )
            elif row in empty:
                # The vocabulary cannot spell what the grammar needs next (a regex over
                # characters no token holds): the request's own constraint, a 400.
                failed[seq.request_id] = InvalidRequestError(
                    "structured outputs: no token of this model's vocabulary can continue "
                    f"the grammar after {seq.num_output_tokens} output tokens"
                )
            else:
                seq.token_bitmask = rows[row]

    def _bitmask_rows(self, count: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The buffer's first ``count`` rows, and a view of each. Views are made once per
        buffer (64 tensor indexings a step cost as much as a third of the fills), and the
        same ``count`` gets the same tensor, which a backend may recognise (llguidance
        checks a new bitmask's layout in every matcher)."""
        if self._buffer.shape[0] < count:
            size = max(count, 2 * self._buffer.shape[0])
            self._buffer = torch.empty(size, bitmask_words(self.vocab_size), dtype=torch.int32)
            self._rows = self._buffer.unbind(0)
            self._firsts.clear()
        first = self._firsts.get(count)
        if first is None:
            first = self._firsts[count] = self._buffer[:count]
        return first, self._rows

    def accept(self, changed: list[Request]) -> tuple[list[str], dict[str, Exception]]:
        """Feed each request's newest token to its matcher. Returns the ids whose grammar
        has ended while they run on (to finish as stopped) and the ids to fail."""
        failed, self.failed = self.failed, {}
        ended: list[str] = []
        matchers = self.matchers
        for request in changed:
            request_id = request.request_id
            matcher = matchers.get(request_id)
            if matcher is None or request_id in failed:
                continue
            token = request.output_token_ids[-1]
            try:
                accepted = matcher.accept_token(token)
                terminated = accepted and matcher.is_terminated()
            except Exception as exc:
                failed[request.request_id] = RequestFailedError(
                    f"the grammar matcher failed: {type(exc).__name__}: {exc}"
                )
                continue
            if not accepted:
                logger.debug("request %s: grammar refused token %d", request.request_id, token)
                # Only the request's own parameters override the mask: a 400.
                failed[request.request_id] = InvalidRequestError(
                    f"token {token} was sampled but the grammar does not allow it (do "
                    "min_tokens, stop_token_ids or logit_bias exclude every token it allows?)"
                )
            elif terminated and not request.status.finished:
                ended.append(request.request_id)
        return ended, failed

    def sweep(self, processor: OutputProcessor) -> None:
        """Forget parked requests and matchers of requests that are gone (finished,
        aborted, failed), whatever path finished them."""
        if self.parked:
            self.parked = [p for p in self.parked if p.parent_id in processor.parents]
        live = processor.child_to_parent
        for request_id in [k for k in self.matchers if k not in live]:
            del self.matchers[request_id]

    def shutdown(self) -> None:
        self.compiler.shutdown()
        self.parked.clear()
        self.deferred = None
        self.matchers.clear()
