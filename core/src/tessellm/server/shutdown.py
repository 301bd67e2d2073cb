"""Graceful shutdown: once asked to stop, the server takes no new request, lets those in
flight finish for up to a timeout, then ends the rest itself: a stream gets an error event
in OpenAI's shape and ``data: [DONE]``, a request with no response yet gets a 503.

Ending them here, rather than leaving it to the ASGI server, matters because uvicorn's own
timeout cancels the request tasks: the client sees its stream cut with neither an error nor
``[DONE]``, and the log gets a ``CancelledError`` traceback per request.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessellm.server.errors import APIError
from tessellm.server.sse import DONE, event

logger = logging.getLogger(__name__)
# Shutdown progress goes where uvicorn reports its own ("Shutting down", ...).
server_logger = logging.getLogger("uvicorn.error")

# A client that stops reading must not hold the shutdown: each closing message gets this long.
CLOSING_SEND_TIMEOUT_S = 1.0


class GracefulShutdown:
    """When the server stops taking requests and when those in flight are cut.

    ``begin`` and ``expire`` run on the server's event loop; a signal handler (another
    frame on the main thread, possibly mid-step of the loop) calls ``on_signal``.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s < 0:
            raise ValueError(f"the shutdown timeout must be >= 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.draining = False
        self.signals = 0
        self.in_flight = 0
        self.is_expired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Future[None] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the server runs on (from the app's start-up)."""
        self._loop = loop

    def on_signal(self) -> None:
        """The first stop signal begins the drain; a second one cuts what is left now."""
        self.signals += 1
        if self._loop is None or self._loop.is_closed():
            return  # not serving yet: nothing is in flight
        action = self.begin if self.signals == 1 else self.expire
        self._loop.call_soon_threadsafe(action)

    def begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        server_logger.info(
            "Refusing new requests; %d in flight get up to %gs to finish",
            self.in_flight,
            self.timeout_s,
        )
        asyncio.get_running_loop().call_later(self.timeout_s, self.expire)

    def expire(self) -> None:
        self.draining = True
        if self.is_expired:
            return
        self.is_expired = True
        if self.in_flight:
            server_logger.info("Ending %d unfinished request(s)", self.in_flight)
        expired = self.expired()
        if not expired.done():
            expired.set_result(None)

    def expired(self) -> asyncio.Future[None]:
        """Done once in-flight requests must end: one future shared by all of them, made
        on the running loop (a test client may run its requests on more than one)."""
        loop = asyncio.get_running_loop()
        if self._expired is None or self._expired.get_loop() is not loop:
            self._expired = loop.create_future()
            if self.is_expired:
                self._expired.set_result(None)
        return self._expired

    def error(self) -> APIError:
        if self.signals > 1:
            why = "it was asked to stop again"
        else:
            why = f"the request did not finish within its {self.timeout_s:g}s shutdown timeout"
        return APIError(
            503,
            f"the server is shutting down: {why}",
            error_type="service_unavailable_error",
            code="server_shutting_down",
        )


class _ResponseState:
    """What has gone out of one response, so that it can be ended in the right form."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.event_stream = False
        self.complete = False

    async def send(self, message: Message) -> None:
        await self._send(message)
        # Recorded after the send: uvicorn writes a message only once its flow-control wait
        # is over, so a send cancelled in that wait wrote nothing.
        if message["type"] == "http.response.start":
            self.started = True
            headers = dict(message.get("headers") or [])
            content_type = headers.get(b"content-type", b"")
            self.event_stream = content_type.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True


class GracefulShutdownMiddleware:
    """Refuses requests while draining (503) and ends those still running at the deadline."""

    def __init__(self, app: ASGIApp, shutdown: GracefulShutdown) -> None:
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.shutdown.draining:
            refusal = APIError(
                503, "the server is shutting down", error_type="service_unavailable_error"
            )
            await refusal.response(headers={"Connection": "close"})(scope, receive, send)
            return
        self.shutdown.in_flight += 1
        try:
            await self._run(scope, receive, send)
        finally:
            self.shutdown.in_flight -= 1

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _ResponseState(send)
        work = asyncio.ensure_future(self.app(scope, receive, response.send))
        try:
            await asyncio.wait({work, self.shutdown.expired()}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            await _settle(work)
            raise
        if work.done():
            work.result()  # the request's own outcome, exception included
            return
        work.cancel()
        await _settle(work)
        if not response.complete:
            await self._end(response, scope, receive)

    async def _end(self, response: _ResponseState, scope: Scope, receive: Receive) -> None:
        error = self.shutdown.error()
        if not response.started:
            messages: list[Message] = []

            async def keep(message: Message) -> None:
                messages.append(message)

            await error.response(headers={"Connection": "close"})(scope, receive, keep)
        elif response.event_stream:
            chunks = (event(error.body()), DONE, b"")
            messages = [
                {"type": "http.response.body", "body": c, "more_body": bool(c)} for c in chunks
            ]
        else:  # a plain body half sent: all that can be done is to end it
            messages = [{"type": "http.response.body", "body": b"", "more_body": False}]
        for message in messages:
            try:
                await asyncio.wait_for(response.send(message), CLOSING_SEND_TIMEOUT_S)
            except (TimeoutError, OSError):
                return  # the client stopped reading; the connection closes with the server


async def _settle(task: asyncio.Future[None]) -> None:
    """Wait for a cancelled request task to unwind (its cleanup aborts engine requests)."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not task.cancelled() or (current is not None and current.cancelling()):
            raise  # this task itself is being cancelled (uvicorn's own timeout)
    except Exception:
        logger.exception("a request failed while being cancelled at shutdown")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose stop signals also drive the app's graceful shutdown: the first
    begins the drain, a second ends in-flight requests at once, a third (SIGINT) quits
    without waiting, as uvicorn's own second does."""

    def __init__(self, config: uvicorn.Config, shutdown: GracefulShutdown) -> None:
        super().__init__(config)
        self.graceful = shutdown

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.graceful.on_signal()
        if self.graceful.signals != 2:
            super().handle_exit(sig, frame)
