"""``POST /v1/embeddings`` (OpenAI's shape), and what an embedding server says to the
generation routes.

``input`` is a string, a list of strings, a list of token ids or a list of such lists;
``encoding_format`` ``"float"`` (numbers) or ``"base64"`` (the float32 little-endian
bytes, as OpenAI sends them); ``dimensions`` only for Matryoshka models. A server started
on an embedding model serves this route and answers the completion routes with a 400; a
generative server answers this route with a 400.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from tessellm.engine.async_pooling import AsyncPoolingEngine
from tessellm.errors import InvalidRequestError
from tessellm.pooling_params import PoolingParams
from tessellm.server.auth import require_api_key
from tessellm.server.context import ServerContext, get_context
from tessellm.server.errors import bad_request
from tessellm.server.protocol import RequestModel, TokenIds, bounded_int
from tessellm.server.routes_common import ERROR_RESPONSES

router = APIRouter(dependencies=[Depends(require_api_key)])
generation_refused = APIRouter(dependencies=[Depends(require_api_key)])

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
Text = Annotated[str, Field(min_length=1)]


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: bounded_int(1, 1 << 20) | None = None  # type: ignore[valid-type]
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def serves_embeddings(engine: object) -> bool:
    """Whether a server on ``engine`` is an embedding server."""
    return isinstance(engine, AsyncPoolingEngine)


def _inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [list(value)]
    return list(value)


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        data = vector.numpy().astype("<f4", copy=False).tobytes()
        return base64.b64encode(data).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def create_embedding(body: EmbeddingRequest, request: Request) -> Response:
    ctx: ServerContext = get_context(request)
    model = ctx.check_model(body.model)
    engine = ctx.engine
    if not isinstance(engine, AsyncPoolingEngine):
        raise bad_request(
            f"the model {model!r} is a generative model: /v1/embeddings needs a server "
            "started on an embedding model (an encoder such as BERT, or a "
            "sentence-transformers checkpoint)",
            param="model",
        )
    params = PoolingParams(dimensions=body.dimensions)
    try:
        # Read-only facts of the model: checked here, before the request queues.
        engine.engine.validate_params(params)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), param="dimensions") from None
    try:
        result = await engine.embed(_inputs(body.input), params)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), param="input") from None
    data = [
        EmbeddingData(index=i, embedding=_encode(vector, body.encoding_format))
        for i, vector in enumerate(result.vectors)
    ]
    tokens = sum(len(ids) for ids in result.token_ids)
    response = EmbeddingResponse(
        data=data, model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _refuse(request: Request) -> None:
    ctx = get_context(request)
    raise bad_request(
        f"the model {ctx.model_names[0]!r} is an embedding model: this server serves "
        f"/v1/embeddings, not {request.url.path}",
        param="model",
    )


@generation_refused.post("/v1/completions", responses=ERROR_RESPONSES)
async def refuse_completion(request: Request) -> None:
    _refuse(request)


@generation_refused.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def refuse_chat_completion(request: Request) -> None:
    _refuse(request)
