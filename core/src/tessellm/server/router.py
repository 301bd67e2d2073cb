"""Several base models behind one server: each with its own engine, loaded on first use,
the least recently used idle one unloaded to make room.

Only a server of more than one model routes through here; one model keeps the plain
``ServerContext`` path. A request's ``model`` picks an entry (a served name or one of its
LoRA adapters); the request holds a lease on it from routing until its response ends
(``ModelLeaseMiddleware`` releases it, streams included), and a leased entry is never
unloaded. Loads run one at a time: room is made first (``max_loaded`` models, and the
``memory_budget`` estimated from each engine's weights + KV cache) by unloading idle
models, waiting for busy ones up to ``load_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from tessellm.lora.request import LoRARequest
from tessellm.server.context import LEASES, ROUTED_CONTEXT, ServerContext
from tessellm.server.errors import APIError
from tessellm.server.models_config import ModelSpec
from tessellm.server.router_loading import (
    engine_bytes,
    estimated_bytes,
    fetch_model,
    free_memory,
    load_error,
)
from tessellm.server.router_metrics import RouterMetrics

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelEntry:
    spec: ModelSpec
    # Adapters served with this model, by name; kept across unloads (run-time ones too).
    lora_modules: dict[str, LoRARequest] = field(default_factory=dict)
    ctx: ServerContext | None = None
    load_task: asyncio.Task[None] | None = None
    leases: int = 0  # requests routed here and not yet answered (waiting for a load too)
    last_used: float = 0.0
    bytes: int = 0  # the loaded engine's estimate (kept after unloading: the next need)
    loads: int = 0
    unloads: int = 0
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ready(self) -> bool:
        return self.ctx is not None and self.ctx.engine.dead is None


class ModelRouter:
    """Owns the engines of several models and their LRU order.

    ``load_engine(spec)`` builds an engine (on a worker thread: it blocks);
    ``make_context(entry, engine)`` wraps a started engine for the routes;
    ``prepare_model(spec)`` fetches and checks a model before room is made for it (tests
    pass fakes).
    """

    def __init__(
        self,
        specs: list[ModelSpec],
        load_engine: Callable[[ModelSpec], Any],
        *,
        max_loaded: int | None = None,
        memory_budget: int | None = None,
        load_timeout: float = 300.0,
        api_key: str | None = None,
        tool_call_parser: str | None = None,
        enable_auto_tool_choice: bool = False,
        make_context: Callable[[ModelEntry, Any], ServerContext] | None = None,
        prepare_model: Callable[[ModelSpec], None] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("a router needs at least one model")
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.entries = [ModelEntry(spec) for spec in specs]
        self.load_engine = load_engine
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget
        self.load_timeout = load_timeout
        self.api_key = api_key
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.make_context = make_context or self._server_context
        self.prepare_model = prepare_model or fetch_model
        self.metrics = RouterMetrics(self)
        self._by_name = {name: e for e in self.entries for name in e.spec.names}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()  # set (and replaced) whenever a lease is released
        self._closing = False
        self.start_error: APIError | None = None

    # -- what the app asks -----------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return [name for e in self.entries for name in e.spec.names]

    @property
    def default(self) -> ModelEntry:
        return self.entries[0]

    @property
    def healthy(self) -> bool:
        return not self._closing

    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.ctx is not None]

    def lookup(self, name: str | None) -> tuple[ModelEntry, str]:
        """The entry serving ``name`` and the served name to answer with; 404 if none."""
        if not name:
            return self.default, self.default.name
        entry = self._by_name.get(name)
        if entry is not None:
            return entry, name
        for entry in self.entries:
            if name in self._adapters(entry):
                return entry, name
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in self.served_names())}",
            param="model",
            code="model_not_found",
        )

    def served_names(self) -> list[str]:
        """Every name a request may give: the models' and their adapters'."""
        return [*self.model_names, *(n for e in self.entries for n in self._adapters(e))]

    def _adapters(self, entry: ModelEntry) -> dict[str, str]:
        """Adapter name → path, configured ones first (listed before their model loads)."""
        found = {} if entry.loads else {name: path for name, path in entry.spec.lora_modules}
        found.update((name, lora.lora_path) for name, lora in entry.lora_modules.items())
        return found

    def model_cards(self) -> list[dict[str, Any]]:
        """``/v1/models``: every model (loaded or not) and its adapters."""
        cards = []
        for e in self.entries:
            length = e.ctx.max_model_len if e.ctx is not None else e.spec.args.max_model_len
            cards += [
                {"id": name, "root": e.spec.args.model, "max_model_len": length}
                for name in e.spec.names
            ]
            cards += [
                {"id": name, "root": path, "parent": e.name, "max_model_len": length}
                for name, path in self._adapters(e).items()
            ]
        return cards

    # -- a request's life ------------------------------------------------------------------
    async def acquire(self, scope: Scope, name: str | None) -> tuple[ServerContext, str]:
        """The context serving ``name`` (loading it if need be) and the name to answer
        with. The entry stays leased until the response ends (``ModelLeaseMiddleware``)."""
        entry, served = self.lookup(name)
        leases = scope.get(LEASES)
        if leases is None:
            raise RuntimeError("ModelLeaseMiddleware is not installed")
        entry.leases += 1  # from here on it is never unloaded, nor while it loads for us
        leases.append(entry)
        entry.last_used = time.monotonic()
        if not entry.ready:
            await self._wait_loaded(entry)
        if entry.ctx is None:  # only while the server stops
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        scope[ROUTED_CONTEXT] = entry.ctx
        return entry.ctx, served

    def release(self, entry: ModelEntry) -> None:
        entry.leases -= 1
        entry.last_used = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_loaded(self, entry: ModelEntry) -> None:
        if entry.load_task is None:
            entry.load_task = asyncio.create_task(self._load(entry))
            # Retrieved here, so that a load nobody waits for any more logs no warning.
            entry.load_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            # Shielded: a client that leaves (or times out) does not stop a shared load.
            await asyncio.wait_for(asyncio.shield(entry.load_task), self.load_timeout)
        except TimeoutError:
            raise APIError(
                503,
                f"the model {entry.name!r} is not loaded yet (waited {self.load_timeout:g} s "
                "for it to load, or for room to load it); retry later",
                param="model",
                code="model_loading",
                headers={"Retry-After": "5"},
            ) from None

    async def start(self) -> None:
        """Load the default model (the server is not ready before it is); its failure is
        kept in ``start_error`` for ``serve`` to report."""
        entry = self.default
        entry.load_task = asyncio.create_task(self._load(entry))
        try:
            await entry.load_task
        except APIError as exc:
            self.start_error = exc
            raise

    async def shutdown(self) -> None:
        self._closing = True
        self._changed.set()  # a load waiting for room gives up now
        for entry in self.entries:
            if entry.load_task is not None:
                await asyncio.gather(entry.load_task, return_exceptions=True)
        for entry in self.loaded():
            await self._unload(entry, why="the server stops")

    # -- loading and unloading -------------------------------------------------------------
    async def _load(self, entry: ModelEntry) -> None:
        try:
            # Fetched and checked first: a bad path or name unloads nothing to make room.
            if not entry.loads:
                try:
                    await asyncio.to_thread(self.prepare_model, entry.spec)
                except Exception as exc:
                    raise load_error(entry.name, exc) from exc
            async with self._load_lock:
                if entry.ready:  # loaded by a load that held the lock before this one
                    return
                if self._closing:
                    raise APIError(503, "the server is shutting down", code="server_shutting_down")
                if entry.ctx is not None:  # its engine died: start afresh
                    await self._unload(entry, why="its engine stopped")
                await self._make_room(entry)
                start = time.monotonic()
                engine = await self._start_engine(entry)
                try:
                    entry.ctx = await self._context(entry, engine)
                except BaseException:
                    await engine.shutdown()
                    raise
                entry.load_seconds = time.monotonic() - start
                entry.bytes = engine_bytes(engine) or entry.bytes
                entry.loads += 1
                logger.info(
                    "model %r loaded in %.2f s (~%.0f MiB)",
                    entry.name,
                    entry.load_seconds,
                    entry.bytes / 2**20,
                )
                await self._trim(entry)
        finally:
            entry.load_task = None

    async def _start_engine(self, entry: ModelEntry) -> Any:
        try:
            engine = await asyncio.to_thread(self.load_engine, entry.spec)
        except Exception as exc:
            raise load_error(entry.name, exc) from exc
        engine.start()
        return engine

    async def _context(self, entry: ModelEntry, engine: Any) -> ServerContext:
        from tessellm.errors import ConfigError
        from tessellm.server.routes_lora import add_adapter

        try:
            ctx = self.make_context(entry, engine)
            for name, path in entry.spec.lora_modules if not entry.loads else ():
                await add_adapter(ctx, name, path)  # the first load's; then they are kept
        except Exception as exc:
            if not entry.loads:  # the next attempt adds them all again
                entry.lora_modules.clear()
            reason = ConfigError(exc.message) if isinstance(exc, APIError) else exc
            raise load_error(entry.name, reason) from exc
        return ctx

    def _server_context(self, entry: ModelEntry, engine: Any) -> ServerContext:
        from tessellm.engine.async_pooling import AsyncPoolingEngine
        from tessellm.errors import ConfigError
        from tessellm.server.tool_setup import ToolCallingConfig, resolve_parser

        if isinstance(engine, AsyncPoolingEngine):
            raise ConfigError("embedding models are served by a server of that one model")
        spec = entry.spec
        ctx = ServerContext(engine, spec.names, spec.args.model, self.api_key, entry.lora_modules)
        ctx.metrics = self.metrics  # one registry for the server, engines labelled by model
        ctx.tool_calling = ToolCallingConfig(self.tool_call_parser, self.enable_auto_tool_choice)
        if resolve_parser(ctx, ctx.tool_calling) is None and self.enable_auto_tool_choice:
            raise ConfigError(
                "--enable-auto-tool-choice: no tool-call parser recognises this model's chat "
                "template; name one with --tool-call-parser"
            )
        return ctx

    def _fits(self, entry: ModelEntry) -> bool:
        others = [e for e in self.loaded() if e is not entry]
        if not others:
            return True  # a model alone always loads, even one larger than the budget
        if self.max_loaded is not None and len(others) + 1 > self.max_loaded:
            return False
        if self.memory_budget is not None:
            need = entry.bytes or estimated_bytes(entry.spec)
            return sum(e.bytes for e in others) + need <= self.memory_budget
        return True

    async def _make_room(self, entry: ModelEntry) -> None:
        deadline = time.monotonic() + self.load_timeout
        while not self._fits(entry):
            if self._closing:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            idle = [e for e in self.loaded() if e is not entry and e.leases == 0]
            if idle:
                victim = min(idle, key=lambda e: e.last_used)
                await self._unload(victim, why=f"room for {entry.name!r}")
                continue
            remaining = deadline - time.monotonic()
            busy = ", ".join(repr(e.name) for e in self.loaded())
            if remaining <= 0:
                raise APIError(
                    503,
                    f"no room to load the model {entry.name!r}: every loaded model ({busy}) has "
                    f"requests in flight (limits: {self._limits()}); retry later",
                    param="model",
                    code="model_capacity",
                    headers={"Retry-After": "5"},
                )
            with suppress(TimeoutError):  # until a lease is released somewhere
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _trim(self, keep: ModelEntry) -> None:
        """After a load (its real size known): unload idle models beyond the budget."""
        if self.memory_budget is None:
            return
        while sum(e.bytes for e in self.loaded()) > self.memory_budget:
            idle = [e for e in self.loaded() if e is not keep and e.leases == 0]
            if not idle:
                logger.warning(
                    "loaded models take ~%d bytes, over --models-memory-budget %d; the busy "
                    "ones stay loaded",
                    sum(e.bytes for e in self.loaded()),
                    self.memory_budget,
                )
                return
            await self._unload(min(idle, key=lambda e: e.last_used), why="the memory budget")

    async def _unload(self, entry: ModelEntry, why: str) -> None:
        ctx, entry.ctx = entry.ctx, None
        if ctx is None:
            return
        entry.unloads += 1
        logger.info("unloading the model %r (%s)", entry.name, why)
        await ctx.engine.shutdown()
        del ctx
        await asyncio.to_thread(free_memory)

    def _limits(self) -> str:
        parts = []
        if self.max_loaded is not None:
            parts.append(f"--max-loaded-models {self.max_loaded}")
        if self.memory_budget is not None:
            parts.append(f"--models-memory-budget {self.memory_budget}")
        return ", ".join(parts) or "none"


class ModelLeaseMiddleware:
    """Releases the model leases a request took (``ModelRouter.acquire``) when its response
    has ended, however it ends: a stream's last event, a disconnect, an error."""

    def __init__(self, app: ASGIApp, router: ModelRouter) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[ModelEntry] = []
        scope[LEASES] = leases  # a list: shared even where a scope is copied
        try:
            await self.app(scope, receive, send)
        finally:
            for entry in leases:
                self.router.release(entry)
