"""Request bodies over ``--max-request-bytes`` get a 413 in OpenAI's shape before they are
read; smaller ones pass untouched, and the server keeps serving."""

from __future__ import annotations

import asyncio
import socket

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tessellm.server.body_limit import BodyLimitMiddleware

LIMIT = 100


def limited_echo() -> tuple[BodyLimitMiddleware, list[int]]:
    """An app that answers with its body's length, behind the bound; what it was given."""
    seen: list[int] = []

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        seen.append(len(body))
        return JSONResponse({"length": len(body)})

    app = Starlette(routes=[Route("/v1/echo", echo, methods=["POST"])])
    return BodyLimitMiddleware(app, limit=LIMIT), seen


def post(app, content) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/echo", content=content)

    return asyncio.run(main())


def test_bodies_within_the_bound_pass_and_larger_ones_are_413s():
    app, seen = limited_echo()
    assert post(app, b"x" * LIMIT).json() == {"length": LIMIT}
    declared = post(app, b"x" * (LIMIT + 50))
    assert declared.status_code == 413
    error = declared.json()["error"]
    assert error["code"] == "request_too_large" and "150 bytes" in error["message"]
    assert "--max-request-bytes" in error["message"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b"y" * 60

    streamed = post(app, chunks())
    assert streamed.status_code == 413
    assert f"over {LIMIT} bytes" in streamed.json()["error"]["message"]
    assert seen == [LIMIT]  # the route never saw either large body


def test_a_declared_huge_body_is_refused_before_it_is_sent(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000000\r\n\r\n"
        )
        reply = b""
        while b"request_too_large" not in reply and (chunk := conn.recv(65536)):
            reply += chunk
    text = reply.decode("latin-1")
    assert text.startswith("HTTP/1.1 413"), text[:200]
    assert "request_too_large" in text
    assert httpx.get(f"{tiny_server.url}/health", timeout=30).status_code == 200
