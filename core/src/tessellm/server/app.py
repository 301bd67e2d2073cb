"""The FastAPI app: OpenAI routes under ``/v1`` plus health, metrics and version."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessellm.config import DEFAULT_MAX_REQUEST_BYTES
from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.server import (
    routes_chat,
    routes_completions,
    routes_embeddings,
    routes_lora,
    routes_sleep,
)
from tessellm.server.auth import APIKeyMiddleware, require_api_key
from tessellm.server.body_limit import BodyLimitMiddleware
from tessellm.server.context import ServerContext, get_context
from tessellm.server.errors import install_error_handlers
from tessellm.server.protocol import ModelCard, ModelList
from tessellm.server.router import ModelLeaseMiddleware, ModelRouter
from tessellm.server.shutdown import GracefulShutdown, GracefulShutdownMiddleware


def tessellm_version() -> str:
    try:
        return version("tessellm")
    except PackageNotFoundError:
        return "unknown"


class HTTPMetricsMiddleware:
    """Counts responses by route template and status (a pure ASGI middleware, so it never
    buffers a stream nor hides the client's disconnect from the route)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.counter.labels(route_label(scope), str(status)).inc()


def route_label(scope: Scope) -> str:
    """The route template a request matched: FastAPI's API routes name themselves in the
    scope; plain Starlette routes (``/docs``, ``/openapi.json``) are found by matching."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "unmatched")
    router = getattr(scope.get("app"), "router", None)
    for candidate in getattr(router, "routes", ()):
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:
            return getattr(candidate, "path", "unmatched")
    return "unmatched"


def build_app(
    engine: AsyncLLMEngine | ModelRouter,
    served_model_names: list[str],
    model_root: str | None = None,
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
    lora_modules: list[tuple[str, str]] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """An app serving ``engine``; the engine thread starts and stops with the app.

    ``app.state.shutdown`` (a :class:`GracefulShutdown`) is what the server's stop signal
    drives: no new requests, then in-flight ones get up to ``shutdown_timeout`` seconds.
    A body over ``max_request_bytes`` gets a 413 before it is read (``body_limit.py``).

    Several models: ``engine`` is a ``ModelRouter``, which requests route through;
    ``app.state.ctx`` is then the router (it holds the server's ``api_key`` and
    ``metrics``).
    """
    router = engine if isinstance(engine, ModelRouter) else None
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    ctx: ServerContext | ModelRouter
    if router is None:
        ctx = ServerContext(
            engine, served_model_names, model_root or served_model_names[0], api_key
        )
    else:
        ctx = router
        router.api_key = api_key
    shutdown = GracefulShutdown(shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shutdown.bind(asyncio.get_running_loop())
        if router is not None:
            await router.start()  # the default model; the others on first use
            try:
                yield
            finally:
                await router.shutdown()
            return
        engine.start()
        for name, path in lora_modules or ():  # checked before serving: a bad one stops here
            await routes_lora.add_adapter(ctx, name, path)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(
        title="tessellm",
        version=tessellm_version(),
        description="OpenAI-compatible API of the tessellm inference engine.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.router = router
    app.state.shutdown = shutdown
    install_error_handlers(app)
    if router is not None:  # the models a request routed to are held until it ends
        app.add_middleware(ModelLeaseMiddleware, router=router)
    # The last added runs first: count everything, then refuse while draining, then auth,
    # then the body's size.
    app.add_middleware(BodyLimitMiddleware, limit=max_request_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(GracefulShutdownMiddleware, shutdown=shutdown)
    app.add_middleware(HTTPMetricsMiddleware, counter=ctx.metrics.http_requests)
    if router is None and routes_embeddings.serves_embeddings(engine):
        app.include_router(routes_embeddings.generation_refused)
    else:
        app.include_router(routes_completions.router)
        app.include_router(routes_chat.router)
        app.include_router(routes_lora.router)
        app.include_router(routes_sleep.router)
    if router is None:
        app.include_router(routes_embeddings.router)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
    async def list_models(request: Request) -> ModelList:
        if router is not None:
            return ModelList(data=[ModelCard(**card) for card in router.model_cards()])
        c = get_context(request)
        cards = [
            ModelCard(id=name, root=c.model_root, max_model_len=c.max_model_len)
            for name in c.model_names
        ]
        cards += [
            ModelCard(
                id=name, root=lora.lora_path, parent=c.model_names[0], max_model_len=c.max_model_len
            )
            for name, lora in c.lora_modules.items()
        ]
        return ModelList(data=cards)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        running = router.healthy if router is not None else get_context(request).engine.is_running
        return JSONResponse({"status": "ok" if running else "unavailable"}, 200 if running else 503)

    @app.get("/version")
    async def show_version() -> dict[str, str]:
        return {"version": tessellm_version()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics in the text exposition format."""
        registry = get_context(request).metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
