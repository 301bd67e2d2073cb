"""The HTTP server behind ``tessellm serve``: uvicorn set up to drain in-flight requests on
SIGTERM, and the several-models mode that routes requests to engines it loads on first use.

Apart from ``cli/serve.py``, which holds the command's options and turns them into engine
arguments: this is what runs once those are settled, and the only part that knows uvicorn.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from tessellm.cli.common import USER_ERROR, fail, progress_note, start_async_engine

# uvicorn cancels request tasks this long after the app's own shutdown deadline (when a
# client stopped reading and the closing messages could not be sent).
SHUTDOWN_BACKSTOP_S = 5.0


def serve_several_models(
    specs: list[Any],
    host: str,
    port: int,
    api_key: str | None,
    log_level: str,
    shutdown_timeout: int,
    tool_call_parser: str | None,
    enable_auto_tool_choice: bool,
    max_loaded_models: int | None,
    models_memory_budget: int | None,
    model_load_timeout: float,
    max_request_bytes: int,
) -> None:
    """Several models on one port: the first loads now, the others on first use."""
    from tessellm.server.app import build_app
    from tessellm.server.router import ModelRouter

    router = ModelRouter(
        specs,
        lambda spec: start_async_engine(spec.args, spec.data_parallel_size),
        max_loaded=max_loaded_models,
        memory_budget=models_memory_budget,
        load_timeout=model_load_timeout,
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
    )
    app = build_app(
        router,
        router.model_names,
        api_key=api_key,
        shutdown_timeout=shutdown_timeout,
        max_request_bytes=max_request_bytes,
    )
    progress_note(
        f"tessellm serve: {', '.join(repr(s.name) for s in specs)} on http://{host}:{port}/v1 "
        f"(loading {specs[0].name!r} now, the others on first use)"
    )
    server = draining_server(app, host, port, log_level, shutdown_timeout)
    # An engine that dies is started afresh on its model's next request (the others serve
    # on), so the server does not exit for it as a one-model server does.
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when the app's start-up failed
        if router.start_error is None:
            raise
    if router.start_error is not None:  # the default model did not load: nothing served
        fail(router.start_error.message, USER_ERROR if router.start_error.status < 500 else 1)


def draining_server(app: Any, host: str, port: int, log_level: str, shutdown_timeout: int) -> Any:
    """The uvicorn server for ``app``, which drains in-flight requests on SIGTERM."""
    import uvicorn

    from tessellm.server.shutdown import DrainingServer

    # A finished graceful shutdown after SIGTERM is a normal end: uvicorn re-raises the
    # signal once done, and this handler turns it into exit status 0.
    signal.signal(signal.SIGTERM, _exit_after_graceful_shutdown)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        # Only a backstop: the app ends what is still running at shutdown_timeout itself.
        timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_BACKSTOP_S,
    )
    return DrainingServer(config, app.state.shutdown)


def _exit_after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
