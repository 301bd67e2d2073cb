"""Bearer-token check for the ``/v1`` routes (``--api-key``)."""

from __future__ import annotations

import hmac

from fastapi import Request

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
