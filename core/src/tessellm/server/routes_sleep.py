"""Engine sleep over HTTP (vLLM's endpoints, behind the API key): ``POST /sleep?level=1``,
``POST /wake_up``, ``GET /is_sleeping``. While asleep, generation requests get a 503 that
says so; ``/health`` stays 200 (the process is fine, a supervisor must not restart it)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from tessellm.server.auth import require_api_key
from tessellm.server.context import model_context
from tessellm.server.routes_common import ERROR_RESPONSES

router = APIRouter(dependencies=[Depends(require_api_key)])
# A server of several models: which one (default: the default model).
MODEL = Query(None, description="The model, on a server of several (default: the first).")


@router.post("/sleep", responses=ERROR_RESPONSES)
async def sleep(
    request: Request, level: int = Query(1, ge=1, le=2), model: str | None = MODEL
) -> JSONResponse:
    """Free the KV cache (level 1: weights to host memory; level 2: weights freed too)."""
    ctx, _ = await model_context(request, model)
    seconds = await ctx.engine.call(lambda engine: engine.sleep(level))
    return JSONResponse({"is_sleeping": True, "level": level, "seconds": round(seconds, 3)})


@router.post("/wake_up", responses=ERROR_RESPONSES)
async def wake_up(request: Request, model: str | None = MODEL) -> JSONResponse:
    ctx, _ = await model_context(request, model)
    seconds = await ctx.engine.call(lambda engine: engine.wake_up())
    return JSONResponse({"is_sleeping": False, "seconds": round(seconds, 3)})


@router.get("/is_sleeping")
async def is_sleeping(request: Request, model: str | None = MODEL) -> JSONResponse:
    ctx, _ = await model_context(request, model)
    level = await ctx.engine.call(lambda engine: engine.sleep_level)
    return JSONResponse({"is_sleeping": bool(level)})
