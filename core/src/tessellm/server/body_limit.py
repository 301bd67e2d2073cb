"""A bound on request bodies (``--max-request-bytes``), checked before anything parses one.

Without it a client could send a body of any size: it was read whole into memory and
parsed on the event loop (every stream waits meanwhile), and a text prompt was tokenized
in full before its token count was checked. A body over the bound gets a 413 in OpenAI's
error shape, from its ``Content-Length`` before any of it is read, or, for a chunked
body, once what has arrived passes the bound (the route never sees it).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessellm.server.errors import APIError


def body_too_large(limit: int, size: int | None = None) -> APIError:
    said = f"{size} bytes" if size is not None else f"over {limit} bytes"
    return APIError(
        413,
        f"the request body is {said}; this server takes at most {limit} "
        "(tessellm serve --max-request-bytes)",
        code="request_too_large",
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await body_too_large(self.limit, declared).response()(scope, receive, send)
            return
        received = 0
        refused = started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await body_too_large(self.limit).response()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; the route's own answer to the cut body does not
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The route saw its body cut off (starlette's ClientDisconnect): answered already.


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
