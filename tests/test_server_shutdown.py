"""Graceful shutdown of a real ``tessellm serve``: on SIGTERM it refuses new requests, lets
in-flight streams finish up to --shutdown-timeout, ends the rest with an OpenAI error event
and ``[DONE]``, and exits 0 without a traceback in its log."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from server_harness import ServerProcess, start_server

pytestmark = pytest.mark.slow

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
