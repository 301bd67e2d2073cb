"""LoRA adapters at run time: vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
(behind the API key), and the adapters ``--lora-modules`` names at start-up."""

from __future__ import annotations

import itertools

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from tessellm.errors import InvalidRequestError
from tessellm.lora.request import LoRARequest
from tessellm.server.auth import require_api_key
from tessellm.server.context import ServerContext, model_context
from tessellm.server.errors import APIError, bad_request
from tessellm.server.routes_common import ERROR_RESPONSES

router = APIRouter(dependencies=[Depends(require_api_key)])
_ids = itertools.count(1)


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    model: str | None = None  # the base model, on a server of several (default: the first)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None
    model: str | None = None


def parse_lora_modules(specs: list[str]) -> list[tuple[str, str]]:
    """``--lora-modules name=path ...`` as (name, path) pairs; ``InvalidRequestError`` for
    one that is not ``name=path``."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidRequestError(f"--lora-modules expects name=path, got {spec!r}")
        pairs.append((name, path))
    return pairs


async def add_adapter(ctx: ServerContext, name: str, path: str) -> LoRARequest:
    """Check the adapter on the engine (its config: rank, format) and serve it as ``name``."""
    if name in ctx.model_names or name in ctx.lora_modules:
        raise bad_request(f"the name {name!r} is already served", param="lora_name")
    lora = LoRARequest(name, next(_ids), path)
    await ctx.engine.call(lambda engine: engine.validate_lora(lora))
    ctx.lora_modules[name] = lora
    return lora


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
    ctx, _ = await model_context(request, body.model)
    router = request.app.state.router
    if router is not None and body.lora_name in router.served_names():
        raise bad_request(f"the name {body.lora_name!r} is already served", param="lora_name")
    await add_adapter(ctx, body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    ctx, _ = await model_context(request, body.model)
    if body.lora_name not in ctx.lora_modules:
        raise APIError(
            404,
            f"no LoRA adapter named {body.lora_name!r} is loaded",
            param="lora_name",
            code="model_not_found",
        )
    # Requests already running with it finish with it; new ones cannot name it.
    del ctx.lora_modules[body.lora_name]
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
