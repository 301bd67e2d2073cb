"""Data parallelism: N engine replicas, each in its own process, behind one async front.

``DataParallelEngine`` offers what the HTTP server uses of ``AsyncLLMEngine`` (``start``,
``shutdown``, ``is_running``, ``new_stream``, ``call``, ``post``, ``stats``,
``max_model_len``, ``tokenizer``, ``engine.model_config``), so ``tessellm serve
--data-parallel-size N`` swaps it in without the routes knowing. Each request goes to the
replica with the fewest unfinished requests (ties: the one given fewest so far). The front
keeps its own tokenizer for the routes' tokenizing and templating; ``stats`` combines the
replicas' (sums, maxima, ratios), and ``replica_collector`` adds per-replica Prometheus
series labelled ``replica``. A replica that dies stops the whole engine with a clear error,
as a failed step stops ``AsyncLLMEngine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import wait
from typing import Any, TypeVar

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine.async_engine import (
    EngineDeadError,
    OutputStream,
    RequestSinks,
    await_compile,
)
from tessellm.engine.dp_replica import ReplicaProcesses
from tessellm.engine.structured_output import StructuredOutputManager
from tessellm.errors import ConfigError, InvalidRequestError, WorkerError
from tessellm.executors.worker import startup_timeout
from tessellm.outputs import RequestOutput
from tessellm.plugins import PluginSet, get_plugins
from tessellm.sampling_params import SamplingParams
from tessellm.selection import choose_platform

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_STATS = frozenset({"batched_seqs_max"})


class FrontView:
    """What ``call(fn)`` hands to ``fn``: the tokenizer and config, as an engine has them."""

    def __init__(self, args: EngineArgs, plugins: PluginSet) -> None:
        resolved = ml.resolve_model(plugins, args.model, args.cache_dir, args.revision)
        self.model_config = ml.weight_format(plugins, resolved).load_config(resolved.path)
        tok_source = (
            resolved
            if args.tokenizer is None
            else ml.resolve_model(plugins, args.tokenizer, args.cache_dir)
        )
        self.tokenizer = ml.weight_format(plugins, tok_source).load_tokenizer(tok_source.path)
        # Grammars compile here too, so a bad schema is a 400 before any replica sees it.
        self.structured = StructuredOutputManager(
            plugins,
            self.tokenizer,
            ml.logits_width(self.model_config, self.tokenizer),
            ml.model_eos_ids(self.model_config, self.tokenizer, resolved.path),
            args,
        )

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def compile_structured(self, params: SamplingParams) -> Future[Any] | None:
        constraint = params.structured_outputs
        return None if constraint is None else self.structured.submit(constraint)


def aggregate_stats(replicas: list[dict[str, float]]) -> dict[str, float]:
    """One engine's worth of stats from several: sums, except maxima and ratios."""
    total: dict[str, float] = {}
    for key in {k for stats in replicas for k in stats}:
        values = [s[key] for s in replicas if key in s]
        total[key] = max(values) if key in MAX_STATS else sum(values)
    blocks = [s.get("num_blocks", 0) for s in replicas]
    if "kv_cache_usage" in total and sum(blocks):
        used = sum(s.get("kv_cache_usage", 0) * b for s, b in zip(replicas, blocks, strict=True))
        total["kv_cache_usage"] = used / sum(blocks)
    if "prefix_cache_hit_rate" in total:
        queried = total.get("prefix_cache_queried_tokens", 0)
        hits = total.get("prefix_cache_hit_tokens", 0)
        total["prefix_cache_hit_rate"] = hits / queried if queried else 0.0
    return total


def replica_placement(
    args: EngineArgs, plugins: PluginSet, replicas: int
) -> tuple[list[str | None], int | None]:
    """Each replica's CUDA devices (None off CUDA) and CPU threads (None: leave as set)."""
    platform, _ = choose_platform(plugins, args.device)
    # A replica's ranks: tensor-parallel ranks of every pipeline stage.
    tp = args.tensor_parallel_size * args.pipeline_parallel_size
    if platform.device_type == "cuda":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (
            [d.strip() for d in visible.split(",") if d.strip()]
            if visible is not None
            else [str(i) for i in range(torch.cuda.device_count())]
        )
        if len(ids) < replicas * tp:
            raise ConfigError(
                f"data_parallel_size {replicas} x {tp} ranks (tensor_parallel_size x "
                f"pipeline_parallel_size) needs "
                f"{replicas * tp} GPUs; {len(ids)} are visible"
            )
        return [",".join(ids[i * tp : (i + 1) * tp]) for i in range(replicas)], None
    if platform.device_type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return [None] * replicas, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [None] * replicas, max(1, (cores or 1) // replicas)


class ReplicaStream(OutputStream):
    """An ``OutputStream`` whose requests the front routes to replicas."""

    async def _submit(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int,
        lora_request: object = None,
    ) -> None:
        if lora_request is not None:
            raise InvalidRequestError("LoRA adapters are not served with data parallelism yet")
        engine: DataParallelEngine = self._engine  # type: ignore[assignment]
        await engine.add_request(request_id, prompt, params, priority)

    def _cancel(self, request_ids: list[str]) -> None:
        engine: DataParallelEngine = self._engine  # type: ignore[assignment]
        engine.abort_request(request_ids)


class DataParallelEngine(RequestSinks):
    def __init__(self, args: EngineArgs, data_parallel_size: int) -> None:
        if data_parallel_size < 1:
            raise ConfigError("data_parallel_size must be at least 1")
        super().__init__()
        plugins = get_plugins()
        self.size = data_parallel_size
        self.engine = FrontView(args, plugins)  # before the replicas: fetches the model once
        self.tokenizer = self.engine.tokenizer
        devices, threads = replica_placement(args, plugins, data_parallel_size)
        self._replicas = ReplicaProcesses(args, devices, threads)
        try:
            self.replica_infos = self._replicas.wait_ready(startup_timeout())
        except BaseException:
            self._replicas.stop()
            raise
        self.replica_stats: list[dict[str, float]] = [i["stats"] for i in self.replica_infos]
        self.stats = aggregate_stats(self.replica_stats)
        self.max_model_len: int = min(i["max_model_len"] for i in self.replica_infos)
        self.routed = [0] * self.size
        self._load = [0] * self.size
        self._owner: dict[str, int] = {}
        self._replies: dict[int, asyncio.Future[None]] = {}
        self._call_ids = itertools.count()
        # One thread for the routes' tokenizer work: HF fast tokenizers dislike sharing.
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="tessellm-front")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs, data_parallel_size: int) -> DataParallelEngine:
        return cls(args, data_parallel_size)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the replicas' outputs; call from the event loop that uses them."""
        if self._reader is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="tessellm-dp-reader", daemon=True)
        self._reader.start()

    async def shutdown(self) -> None:
        """Fail what is still waiting, then stop every replica."""
        self._stopping = True
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join)
            self._reader = None
        self._fail_all(EngineDeadError("the server is shutting down"))
        await asyncio.to_thread(self._replicas.stop)
        self._calls.shutdown(wait=False)
        self.engine.structured.shutdown()

    @property
    def is_running(self) -> bool:
        return self._reader is not None and self.dead is None and not self._stopping

    def describe(self) -> dict[str, str]:
        first = self.replica_infos[0]["describe"]
        return {**first, "data_parallel_size": str(self.size)}

    # -- API for the event loop ----------------------------------------------------------
    def new_stream(self) -> OutputStream:
        return ReplicaStream(self)  # type: ignore[arg-type]

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(front view)`` (tokenizer work) off the event loop."""
        self._check_alive()
        return await asyncio.get_running_loop().run_in_executor(self._calls, fn, self.engine)

    async def front_call(self, fn: Callable[[Any], T]) -> T:
        """As ``AsyncLLMEngine.front_call``: this front's tokenizer is its own already."""
        return await self.call(fn)

    def post(self, fn: Callable[[Any], Any]) -> None:
        self._calls.submit(fn, self.engine)

    async def prepare_structured(self, params: SamplingParams) -> None:
        """As ``AsyncLLMEngine.prepare_structured``: the grammar compiled in this front
        process, ``InvalidRequestError`` (a 400) for an invalid one."""
        self._check_alive()
        future = self.engine.compile_structured(params)
        if future is not None:
            await await_compile(future, self.engine.structured.compile_timeout_s)

    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> None:
        """Route one request to the least-loaded replica; raises what the replica refused."""
        self._check_alive()
        if request_id in self._owner:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        index = min(range(self.size), key=lambda i: (self._load[i], self.routed[i]))
        call_id = next(self._call_ids)
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._replies[call_id] = reply
        self._owner[request_id] = index
        self._load[index] += 1
        self.routed[index] += 1
        try:
            try:
                self._replicas.send(index, ("add", call_id, request_id, prompt, params, priority))
            except (OSError, ValueError):
                raise EngineDeadError(f"data-parallel replica {index} is gone") from None
            await reply
        except asyncio.CancelledError:
            raise  # the stream aborts it, which releases it
        except BaseException:
            self._release(request_id)
            raise
        finally:
            self._replies.pop(call_id, None)

    def abort_request(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            index = self._release(request_id)
            if index is not None:
                by_replica.setdefault(index, []).append(request_id)
        for index, ids in by_replica.items():
            # A replica that is gone has nothing left to abort.
            with contextlib.suppress(OSError, ValueError):
                self._replicas.send(index, ("abort", ids))

    def _release(self, request_id: str) -> int | None:
        index = self._owner.pop(request_id, None)
        if index is not None:
            self._load[index] -= 1
        return index

    # -- on the event loop, from the reader thread ---------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put_nowait(out)
            if out.finished:
                self._sinks.pop(out.request_id, None)
                self._release(out.request_id)

    def _resolve_reply(self, call_id: int, error: BaseException | None) -> None:
        reply = self._replies.get(call_id)
        if reply is None or reply.done():
            return
        if error is not None:
            reply.set_exception(error)
        else:
            reply.set_result(None)

    def _fail_all(self, error: BaseException) -> None:
        super()._fail_all(error)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(error)

    # -- the reader thread ---------------------------------------------------------------
    def _read(self) -> None:
        assert self._loop is not None
        loop, replicas = self._loop, self._replicas
        index_of: dict[Any, int] = {}
        for i in range(self.size):
            index_of[replicas.inboxes[i]] = i
            index_of[replicas.procs[i].sentinel] = i
        while not self._stopping:
            try:
                ready_list = wait(list(index_of), timeout=0.5)
            except (OSError, ValueError):  # the pipes were closed under us: stopping
                return
            for ready in ready_list:
                if self._stopping:
                    return
                index = index_of[ready]
                message = replicas.receive(index)
                kind = message[0]
                if kind == "outputs":
                    self._update_stats(index, message[2])
                    loop.call_soon_threadsafe(self._dispatch, message[1])
                elif kind == "stats":
                    self._update_stats(index, message[1])
                elif kind == "reply":
                    loop.call_soon_threadsafe(self._resolve_reply, message[1], message[2])
                else:
                    self._die(message[1])
                    return

    def _update_stats(self, index: int, stats: dict[str, float]) -> None:
        self.replica_stats[index] = stats
        self.stats = aggregate_stats(self.replica_stats)

    def _die(self, why: str) -> None:
        logger.error("data-parallel engine stopped: %s", why)
        self.dead = WorkerError(why)
        assert self._loop is not None
        error = EngineDeadError(f"the engine stopped: {why}")
        self._loop.call_soon_threadsafe(self._fail_all, error)
        self._replicas.stop()  # the others too: a partial engine would hide the failure

    # -- metrics -------------------------------------------------------------------------
    def replica_collector(self, prefix: str) -> Any:
        """A Prometheus collector of per-replica series (label ``replica``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self
        series = [
            ("num_running", "replica_num_requests_running", "Running sequences.", "gauge"),
            ("num_waiting", "replica_num_requests_waiting", "Waiting sequences.", "gauge"),
            ("kv_cache_usage", "replica_kv_cache_usage_perc", "KV cache in use.", "gauge"),
            ("generation_tokens", "replica_generation_tokens", "Tokens generated.", "counter"),
        ]

        class ReplicaCollector:
            def collect(self) -> Iterator[Any]:
                for key, name, help_text, kind in series:
                    family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    metric = family(f"{prefix}{name}", help_text, labels=["replica"])
                    for i, stats in enumerate(engine.replica_stats):
                        metric.add_metric([str(i)], float(stats.get(key, 0)))
                    yield metric
                routed = CounterMetricFamily(
                    f"{prefix}replica_requests_routed", "Requests routed.", labels=["replica"]
                )
                for i, count in enumerate(engine.routed):
                    routed.add_metric([str(i)], float(count))
                yield routed

        return ReplicaCollector()
