"""Bearer-token check for the ``/v1`` routes (``--api-key``): a middleware that runs before
the body is read, and the routes' own dependency."""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from tessellm.server.errors import APIError


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Raise a 401 unless ``authorization`` is ``Bearer <expected>`` (or no key is set)."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest on bytes takes the same time wherever the first difference is.
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(given, expected.encode()):
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: the key configured on the app, from the Authorization header."""
    check_api_key(request.app.state.ctx.api_key, request.headers.get("authorization"))


class APIKeyMiddleware:
    """Checks the key of every ``/v1`` request before routing, so that a client without
    the key learns that first (401), whatever its body, and never how its body is wrong."""

    def __init__(self, app: ASGIApp, api_key: str | None, prefix: str = "/v1") -> None:
        self.app = app
        self.api_key = api_key
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is not None and scope["type"] == "http" and self._guarded(scope["path"]):
            authorization = None
            for name, value in scope.get("headers") or ():
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            try:
                check_api_key(self.api_key, authorization)
            except APIError as exc:
                await exc.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _guarded(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")
