"""An asyncio front for ``LLMEngine``: one engine thread steps every request together.

The HTTP server handles many clients on one event loop; the engine is synchronous and not
thread-safe. So a single background thread owns the engine: it runs queued commands (add,
abort, tokenize ...) between steps, then calls ``step()`` while there is work, and hands
each step's outputs to the event loop in one ``call_soon_threadsafe``, waiting (briefly)
until the loop has sent them before it starts the next step. Requests from all
clients therefore share the same steps (continuous batching across clients) and the event
loop never waits on a forward pass.

A request that breaks a step fails alone: ``LLMEngine.step`` finds it and returns its final
output as a ``FailedRequestOutput``, which its stream raises as the error. An exception
that leaves ``step()`` is not attributable to a request (a worker died, the device is
lost): it marks the engine dead, fails every request and calls the ``on_dead`` callbacks
(the server exits on it, non-zero, so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, TypeVar

from tessellm.config import EngineArgs
from tessellm.engine.front_thread import FrontThread, TokenizerFront
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.step_recovery import FailedRequestOutput
from tessellm.engine.structured_output import compile_timeout_error
from tessellm.errors import TessellmError
from tessellm.outputs import RequestOutput
from tessellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Longest the engine thread waits for the event loop to send a step's outputs: the loop's
# share of a step (a few streams' SSE chunks) takes well under a millisecond; a loop busy
# for longer does not hold steps back.
HAND_OVER_WAIT_S = 0.002
Command = tuple[Callable[[LLMEngine], Any], "asyncio.Future[Any] | None"]


class EngineDeadError(TessellmError):
    """The engine thread stopped (shut down, or a step failed); no request can run."""


def _snapshot(out: RequestOutput) -> RequestOutput:
    # The engine keeps mutating its CompletionOutputs on later steps; the event loop must
    # see a consistent copy of this step's state.
    completions = [
        replace(
            c,
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs) if c.logprobs is not None else None,
        )
        for c in out.outputs
    ]
    prompt_logprobs = list(out.prompt_logprobs) if out.prompt_logprobs is not None else None
    return replace(
        out, outputs=completions, prompt_logprobs=prompt_logprobs, metrics=dict(out.metrics)
    )


def _resolve(future: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class OutputStream:
    """The outputs of one or more engine requests added together (one HTTP request).

    ``add`` submits a request (raising ``InvalidRequestError`` for bad input before any
    output is produced); ``next_outputs`` waits for the next outputs, keeping only the
    latest per request since outputs are cumulative. ``abort`` cancels every unfinished
    request of the stream and is safe to call more than once.
    """

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.request_ids: list[str] = []
        self._unfinished: set[str] = set()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def add(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        lora_request: Any = None,
        multi_modal_data: dict[str, Any] | None = None,
    ) -> None:
        self._engine._register(request_id, self._queue)
        self.request_ids.append(request_id)
        self._unfinished.add(request_id)
        try:
            if multi_modal_data is not None:  # images (LLMEngine.add_request's argument)
                await self._engine.call(
                    lambda e: e.add_request(
                        request_id,
                        prompt,
                        params,
                        priority,
                        lora_request=lora_request,
                        multi_modal_data=multi_modal_data,
                    )
                )
                return
            await self._submit(request_id, prompt, params, priority, lora_request)
        except asyncio.CancelledError:
            self.abort()  # the add may still go through; the abort is queued behind it
            raise
        except BaseException:
            self._unfinished.discard(request_id)
            self._engine._unregister(request_id)
            raise

    async def next_outputs(self) -> list[RequestOutput]:
        """Outputs that arrived since the last call (at least one), one per request."""
        if self.finished:
            return []
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[str, RequestOutput] = {}
        for item in items:
            if isinstance(item, FailedRequestOutput):  # this request broke a step
                self._unfinished.discard(item.request_id)
                item = item.error or EngineDeadError("the request failed")
            if isinstance(item, BaseException):
                self.abort()
                raise item
            latest[item.request_id] = item
            if item.finished:
                self._unfinished.discard(item.request_id)
        return list(latest.values())

    def abort(self) -> None:
        if self._unfinished:
            ids = sorted(self._unfinished)
            self._unfinished.clear()
            for request_id in ids:
                self._engine._unregister(request_id)
            self._cancel(ids)

    async def _submit(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int,
        lora_request: Any = None,
    ) -> None:
        if lora_request is None:
            await self._engine.call(lambda e: e.add_request(request_id, prompt, params, priority))
            return
        await self._engine.call(
            lambda e: e.add_request(request_id, prompt, params, priority, lora_request=lora_request)
        )

    def _cancel(self, request_ids: list[str]) -> None:
        self._engine.post(lambda e: e.abort_request(request_ids))


class RequestSinks:
    """Where each request's outputs go on the event loop, and whether new ones may come.

    Shared by the single-process and the data-parallel engine; ``dead`` is the error that
    stopped the engine (setting it, from any thread, runs the ``on_dead`` callbacks on the
    event loop), ``_stopping`` is set by ``shutdown``.
    """

    def __init__(self) -> None:
        self._sinks: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._dead_callbacks: list[Callable[[BaseException], Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def dead(self) -> BaseException | None:
        return self._dead

    @dead.setter
    def dead(self, error: BaseException | None) -> None:
        first = self._dead is None and error is not None
        self._dead = error
        if first and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._run_dead_callbacks, error)

    def on_dead(self, callback: Callable[[BaseException], Any]) -> None:
        """Call ``callback(error)`` on the event loop once the engine dies (not on a
        shutdown): e.g. to stop the server, which should then exit non-zero."""
        self._dead_callbacks.append(callback)

    def _run_dead_callbacks(self, error: BaseException) -> None:
        for callback in self._dead_callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("an on_dead callback failed")

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        if self._stopping:
            raise EngineDeadError("the server is shutting down")

    def _register(self, request_id: str, sink: asyncio.Queue[Any]) -> None:
        self._check_alive()
        self._sinks[request_id] = sink

    def _unregister(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.put_nowait(error)


async def await_compile(future: Future[Any], timeout_s: float) -> None:
    """Wait for a grammar's compile (``InvalidRequestError`` past ``timeout_s``). Shielded:
    a client that goes away must not cancel a compile other requests share."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
    except TimeoutError:
        raise compile_timeout_error(timeout_s) from None


class AsyncLLMEngine(RequestSinks):
    """Runs an ``LLMEngine`` on its own thread and serves it to asyncio code."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.stats: dict[str, float] = engine.stats()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._front = FrontThread(engine.tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        return cls(LLMEngine(args))

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will use this engine."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tessellm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort what is still running, stop the thread and release the engine."""
        if self._thread is None:
            return
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._front.shutdown()
        self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self.dead is None and not self._stopping

    # -- API for the event loop ----------------------------------------------------------
    def new_stream(self) -> OutputStream:
        return OutputStream(self)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        self._check_alive()
        assert self._loop is not None, "start() the engine first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, future))
        self._wakeup.set()
        return await future

    async def front_call(self, fn: Callable[[TokenizerFront], T]) -> T:
        """Run ``fn(front)`` (tokenizing, detokenizing, chat templates) with the routes' own
        tokenizer on their own thread: it does not wait for a step (``front_thread.py``)."""
        self._check_alive()
        return await self._front.call(fn)

    async def prepare_structured(self, params: SamplingParams) -> None:
        """Compile ``params``' grammar (if it has one) without blocking the event loop:
        ``InvalidRequestError`` naming the problem of an invalid schema, regex or grammar
        (a 400), before the request is added. The compile is cached, so the request then
        starts at once."""
        self._check_alive()
        future = self.engine.compile_structured(params)  # thread-safe: starts or finds it
        if future is not None:
            await await_compile(future, self.engine.structured.compile_timeout_s)

    def post(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Queue ``fn(engine)`` without waiting for it (aborts from cleanup code)."""
        if self._thread is not None:
            self._commands.put((fn, None))
            self._wakeup.set()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        # Runs on the event loop.
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put_nowait(out)
                if out.finished:
                    del self._sinks[out.request_id]

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            while not self._stopping:
                self._run_commands(loop)
                if self.engine.has_unfinished_requests():
                    outputs = [_snapshot(o) for o in self.engine.step()]
                    if outputs:
                        self._hand_over(loop, outputs)
                else:
                    self._wakeup.wait()
                    self._wakeup.clear()  # commands queued meanwhile run on the next pass
                self.stats = self.engine.stats()
            self._drain_commands(loop, EngineDeadError("the server is shutting down"))
        except BaseException as exc:  # not attributable to a request: nothing can run
            logger.exception("the engine stopped; failing every request")
            self.dead = exc  # first: a request that sees its failure sees a dead engine
            error = EngineDeadError(f"the engine stopped: {exc!r}")
            loop.call_soon_threadsafe(self._fail_all, error)
            self._drain_commands(loop, error)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, outputs: list[RequestOutput]) -> None:
        """Give a step's outputs to the event loop and let it send them before the next
        step, waiting at most ``HAND_OVER_WAIT_S``. Without the wait this thread took the
        GIL straight back for the next step, and a step that holds it throughout (the
        CPU's compiled decode call) kept every token from its client for one more step:
        TTFT +12-17 ms on 2 cores (bench/RESULTS.md, 2026-12-06)."""
        sent = threading.Event()

        def dispatch() -> None:
            self._dispatch(outputs)
            loop.call_soon(sent.set)  # after the streams woken here have written

        loop.call_soon_threadsafe(dispatch)
        sent.wait(HAND_OVER_WAIT_S)

    def _run_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(self.engine), None
            except Exception as exc:
                result, error = None, exc
                if future is None:
                    logger.exception("an engine command failed")
            if future is not None:
                loop.call_soon_threadsafe(_resolve, future, result, error)

    def _drain_commands(self, loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                loop.call_soon_threadsafe(_resolve, future, None, error)
