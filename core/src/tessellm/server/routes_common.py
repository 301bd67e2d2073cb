"""Pieces shared by the generation routes."""

from __future__ import annotations

from typing import Any

from tessellm.engine.async_engine import OutputStream
from tessellm.outputs import RequestOutput
from tessellm.server.metrics import RequestTimer
from tessellm.server.protocol import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "An invalid field, or a prompt too long."},
    401: {"model": ErrorResponse, "description": "A missing or wrong API key."},
    404: {"model": ErrorResponse, "description": "A model this server does not serve."},
}


async def collect_outputs(stream: OutputStream, timer: RequestTimer) -> list[RequestOutput]:
    """Wait for every request of ``stream`` to finish; their final outputs in order."""
    latest: dict[str, RequestOutput] = {}
    try:
        while not stream.finished:
            outputs = await stream.next_outputs()
            timer.observe(outputs)
            latest.update((o.request_id, o) for o in outputs)
    finally:
        stream.abort()
    return [latest[rid] for rid in stream.request_ids if rid in latest]
