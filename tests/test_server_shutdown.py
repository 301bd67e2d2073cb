"""Graceful shutdown: the middleware on its own (an ASGI app that streams forever), then a
real ``tessellm serve``: on SIGTERM it refuses new requests, lets in-flight streams finish
up to --shutdown-timeout, ends the rest with an OpenAI error event and ``[DONE]``, and
exits 0 without a traceback in its log."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from server_harness import ServerProcess, start_server

from tessellm.server.shutdown import GracefulShutdown, GracefulShutdownMiddleware

# Alone, not beside other tests (the README's command runs these after the parallel
# part): they bound how long a shutdown or a switch may take.
pytestmark = pytest.mark.serial

SSE_HEADERS = [(b"content-type", b"text/event-stream")]


async def endless_stream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    while True:
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        await asyncio.sleep(0.01)


async def slow_answer(scope, receive, send):
    await asyncio.sleep(3600)


async def call(app, shutdown: GracefulShutdown, begin_after_s: float | None) -> list[dict]:
    """The messages ``app`` behind the middleware sends to one request."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    shutdown.bind(asyncio.get_running_loop())
    middleware = GracefulShutdownMiddleware(app, shutdown)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    request = asyncio.ensure_future(middleware(scope, receive, send))
    if begin_after_s is not None:
        await asyncio.sleep(begin_after_s)
        shutdown.begin()
    await asyncio.wait_for(request, 5)
    return sent


def test_a_stream_running_at_the_deadline_ends_with_an_error_event_and_done():
    shutdown = GracefulShutdown(timeout_s=0.05)
    sent = asyncio.run(call(endless_stream, shutdown, begin_after_s=0.05))
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["type"] == "http.response.start" and bodies[0] == b"data: {}\n\n"
    error = json.loads(bodies[-3][len(b"data: ") :])["error"]
    assert error["type"] == "service_unavailable_error"
    assert error["code"] == "server_shutting_down" and "0.05s shutdown timeout" in error["message"]
    assert bodies[-2:] == [b"data: [DONE]\n\n", b""] and not sent[-1]["more_body"]
    assert shutdown.in_flight == 0


def test_a_request_unanswered_at_the_deadline_gets_a_503():
    sent = asyncio.run(call(slow_answer, GracefulShutdown(timeout_s=0), begin_after_s=0.01))
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "server_shutting_down"


def test_a_draining_server_refuses_new_requests():
    async def refused():
        shutdown = GracefulShutdown(timeout_s=60)
        shutdown.bind(asyncio.get_running_loop())
        shutdown.begin()
        return await call(slow_answer, shutdown, begin_after_s=None)

    sent = asyncio.run(refused())
    assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]


# Far more work than a short timeout allows: 32 sequences of 480 tokens take the tiny model
# several seconds, while SHORT finishes in a fraction of one.
LONG = {"prompt": "The quick brown fox", "max_tokens": 480, "n": 32, "ignore_eos": True}
SHORT = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}


class Stream:
    """A streamed completion read on its own thread: its data lines as they arrive."""

    def __init__(self, server: ServerProcess, body: dict) -> None:
        self.events: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, args=(server, body), daemon=True)
        self.thread.start()

    def _read(self, server: ServerProcess, body: dict) -> None:
        url = server.base_url + "/completions"
        try:
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: ") :])
                        self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()

    def join(self) -> list[str]:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the stream never ended"
        assert self.error is None, repr(self.error)
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]
        return self.events[:-1]


def finish_reasons(chunks: list[str]) -> dict[int, str]:
    reasons = {}
    for data in chunks:
        for choice in json.loads(data).get("choices") or []:
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return reasons


def assert_clean_exit(server: ServerProcess, signalled_at: float, within_s: float) -> None:
    assert server.process.wait(within_s + 30) == 0, server.log()
    elapsed = time.monotonic() - signalled_at
    assert elapsed < within_s, f"exit took {elapsed:.1f}s\n{server.log()}"
    log = server.log()
    for bad in ("Traceback", "CancelledError", "ERROR"):
        assert bad not in log, log


def assert_ended_by_shutdown(chunks: list[str]) -> None:
    """The last chunk before [DONE] is an error in OpenAI's shape, saying why."""
    error = json.loads(chunks[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "service_unavailable_error"
    assert "shutting down" in error["message"]
    # Everything before it is ordinary, unfinished output.
    assert all("error" not in json.loads(c) for c in chunks[:-1])
    assert len(finish_reasons(chunks[:-1])) < LONG["n"]


@pytest.mark.slow
def test_sigterm_finishes_short_streams_and_ends_long_ones_at_the_timeout(tiny_llama, tmp_path):
    timeout_s = 2
    server = start_server(tiny_llama, tmp_path, "--shutdown-timeout", str(timeout_s))
    try:
        long = Stream(server, LONG)
        assert long.started.wait(60)
        short = Stream(server, SHORT)
        assert short.started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        time.sleep(0.5)
        # Draining: a new request is refused (503, or no connection once the port is closed).
        try:
            refused = httpx.post(server.base_url + "/completions", json=SHORT, timeout=10)
            assert refused.status_code == 503, refused.text
        except httpx.TransportError:
            pass
        assert finish_reasons(short.join()) == {0: "length"}
        long_chunks = long.join()
        if len(finish_reasons(long_chunks)) < LONG["n"]:  # the usual case: cut at the timeout
            assert_ended_by_shutdown(long_chunks)
            assert (
                f"{timeout_s}s shutdown timeout" in json.loads(long_chunks[-1])["error"]["message"]
            )
        assert_clean_exit(server, signalled_at, timeout_s + 8)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_second_signal_ends_in_flight_streams_at_once(tiny_llama, tmp_path):
    server = start_server(tiny_llama, tmp_path, "--shutdown-timeout", "60")
    try:
        long = Stream(server, LONG)
        assert long.started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        chunks = long.join()
        assert_ended_by_shutdown(chunks)
        assert "asked to stop again" in json.loads(chunks[-1])["error"]["message"]
        assert_clean_exit(server, signalled_at, 10)
    finally:
        server.stop()
