"""An asyncio front for ``PoolingEngine``: one thread embeds every client's inputs together.

Each HTTP request becomes a job (its inputs and ``PoolingParams``). The engine thread owns
the engine and its tokenizer: it takes every job queued so far, tokenizes and checks each
(a job with a bad input fails alone, as a 400), then embeds the inputs of all the good
jobs in one ``embed_token_ids`` call, so that requests from several clients share
forwards. Jobs that arrive meanwhile wait for the next round.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tessellm.config import EngineArgs
from tessellm.engine.async_engine import EngineDeadError, RequestSinks
from tessellm.engine.pooling import PoolingEngine
from tessellm.pooling_params import PoolingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
Inputs = Sequence[str | Sequence[int]]


@dataclass(slots=True)
class EmbeddingResult:
    token_ids: list[list[int]]
    vectors: list[torch.Tensor]


@dataclass(slots=True)
class _Job:
    inputs: Inputs | None
    params: PoolingParams | None
    future: asyncio.Future[Any]
    command: Callable[[PoolingEngine], Any] | None = None


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class AsyncPoolingEngine(RequestSinks):
    """Runs a ``PoolingEngine`` on its own thread and serves it to asyncio code."""

    def __init__(self, engine: PoolingEngine) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.stats: dict[str, float] = engine.stats()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncPoolingEngine:
        return cls(PoolingEngine(args))

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tessellm-pooling", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        # A job that passed the liveness check just before the stop was queued late.
        self._drain(EngineDeadError("the server is shutting down"))
        self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self.dead is None and not self._stopping

    # -- API for the event loop ----------------------------------------------------------
    async def embed(self, inputs: Inputs, params: PoolingParams) -> EmbeddingResult:
        """The token ids and vector of each input; ``InvalidRequestError`` for a bad one."""
        return await self._submit(_Job(inputs, params, self._new_future()))

    async def call(self, fn: Callable[[PoolingEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between forwards."""
        return await self._submit(_Job(None, None, self._new_future(), fn))

    def _new_future(self) -> asyncio.Future[Any]:
        self._check_alive()
        assert self._loop is not None, "start() the engine first"
        return self._loop.create_future()

    async def _submit(self, job: _Job) -> Any:
        self._jobs.put(job)
        return await job.future

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                first = self._jobs.get()
                if first is None:
                    break
                jobs = [first]
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        jobs.append(job)
                self._serve(jobs)
                self.stats = self.engine.stats()
            self._drain(EngineDeadError("the server is shutting down"))
        except BaseException as exc:  # not attributable to a job: nothing can run
            logger.exception("the pooling engine stopped")
            self.dead = exc
            self._drain(EngineDeadError(f"the engine stopped: {exc!r}"))

    def _serve(self, jobs: list[_Job]) -> None:
        assert self._loop is not None
        ready: list[tuple[_Job, list[list[int]]]] = []
        for job in jobs:
            try:
                if job.command is not None:
                    self._reply(job, job.command(self.engine), None)
                    continue
                assert job.inputs is not None and job.params is not None
                self.engine.validate_params(job.params)
                ready.append((job, [self.engine.prepare(item) for item in job.inputs]))
            except Exception as exc:  # this job's input (a 400), or its command's error
                self._reply(job, None, exc)
        if not ready:
            return
        prompts = [ids for _, batch in ready for ids in batch]
        params = [job.params for job, batch in ready for _ in batch]
        try:
            vectors = self.engine.embed_token_ids(prompts, params)  # type: ignore[arg-type]
        except Exception as exc:  # not the input's fault: these jobs fail, the server goes on
            logger.exception("an embedding forward failed")
            for job, _ in ready:
                self._reply(job, None, exc)
            return
        start = 0
        for job, batch in ready:
            self._reply(job, EmbeddingResult(batch, vectors[start : start + len(batch)]), None)
            start += len(batch)

    def _reply(self, job: _Job, result: Any, error: BaseException | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _drain(self, error: BaseException) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._reply(job, None, error)
