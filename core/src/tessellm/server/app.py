"""The FastAPI app: OpenAI routes under ``/v1`` plus health, metrics and version."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.server import routes_chat, routes_completions
from tessellm.server.auth import require_api_key
from tessellm.server.context import ServerContext, get_context
from tessellm.server.errors import install_error_handlers
from tessellm.server.protocol import ModelCard, ModelList


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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route, str(status)).inc()


def build_app(
    engine: AsyncLLMEngine,
    served_model_names: list[str],
    model_root: str | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """An app serving ``engine``; the engine thread starts and stops with the app."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    ctx = ServerContext(engine, served_model_names, model_root or served_model_names[0], api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
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
    install_error_handlers(app)
    app.add_middleware(HTTPMetricsMiddleware, counter=ctx.metrics.http_requests)
    app.include_router(routes_completions.router)
    app.include_router(routes_chat.router)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
    async def list_models(request: Request) -> ModelList:
        c = get_context(request)
        cards = [
            ModelCard(id=name, root=c.model_root, max_model_len=c.max_model_len)
            for name in c.model_names
        ]
        return ModelList(data=cards)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        running = get_context(request).engine.is_running
        return JSONResponse({"status": "ok" if running else "unavailable"}, 200 if running else 503)

    @app.get("/version")
    async def show_version() -> dict[str, str]:
        return {"version": tessellm_version()}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        registry = get_context(request).metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
