"""``POST /v1/chat/completions``: messages through the model's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from tessellm.engine.async_engine import OutputStream
from tessellm.outputs import CompletionOutput, Logprob, RequestOutput
from tessellm.server.auth import require_api_key
from tessellm.server.context import (
    ChoiceUpdate,
    DeltaTracker,
    Prompt,
    model_context,
    new_id,
    usage_of,
)
from tessellm.server.errors import bad_request, to_api_error
from tessellm.server.images import process_images, take_images
from tessellm.server.metrics import RequestTimer
from tessellm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
from tessellm.server.routes_common import ERROR_RESPONSES, collect_outputs
from tessellm.server.sse import DONE, EventStreamResponse, event, run_until_disconnect
from tessellm.server.structured import constrain
from tessellm.server.tool_calls import ToolSession, tool_session

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx, model = await model_context(request, body.model)
    images = await take_images(ctx, body)  # before the messages are read: placeholders
    tools = tool_session(request, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    rendered = await ctx.chat_prompt(tools.messages, body.add_generation_prompt, tools.tools)
    rendered, processed = await process_images(ctx, rendered, images)
    prompt = Prompt(None, rendered)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = ctx.token_budget(len(prompt.token_ids), requested, True, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = ctx.sampling_params(body, max_tokens, logprobs)
    params = tools.adjust(await constrain(ctx, body, params, tools.constraints))
    request_id = new_id("chatcmpl")
    stream = ctx.engine.new_stream()
    try:
        await stream.add(
            request_id,
            prompt.token_ids,
            params,
            lora_request=ctx.lora_for(model),
            multi_modal_data=processed,
        )
    except BaseException:
        stream.abort()
        raise
    timer = RequestTimer(ctx.metrics)
    if body.stream:
        events = _events(body, model, request_id, prompt, stream, timer, tools)
        return EventStreamResponse(events, on_close=stream.abort)
    finished, outputs = await run_until_disconnect(request.receive, collect_outputs(stream, timer))
    if not finished:
        return Response(status_code=499)
    top = body.top_logprobs or 0
    choices = [
        tools.shape(
            ChatChoice(
                index=u.index,
                message=AssistantMessage(content=u.text),
                logprobs=_logprobs(u.completion, u.token_start, top) if body.logprobs else None,
                finish_reason=u.finish_reason,  # type: ignore[arg-type]
                stop_reason=u.completion.stop_reason,
            )
        )
        for u in DeltaTracker(stream.request_ids, body.n).updates(outputs)
    ]
    choices.sort(key=lambda c: c.index)
    response = ChatCompletionResponse(
        id=request_id, model=model, choices=choices, usage=usage_of([prompt], outputs)
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _token_logprob(lp: Logprob) -> TopLogprob:
    token = lp.decoded_token or ""
    return TopLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()))


def _logprobs(comp: CompletionOutput, start: int, top: int) -> ChatLogprobs | None:
    if comp.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(comp.token_ids[start:], comp.logprobs[start:], strict=False):
        chosen = _token_logprob(entry[token_id])
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda x: x.rank)
        content.append(
            ChatTokenLogprob(
                **chosen.model_dump(), top_logprobs=[_token_logprob(lp) for lp in ranked[:top]]
            )
        )
    return ChatLogprobs(content=content)


def _chunk(request_id: str, model: str, choice: ChatChunkChoice) -> bytes:
    return event(ChatCompletionChunk(id=request_id, model=model, choices=[choice]))


def _delta_choice(update: ChoiceUpdate, body: ChatCompletionRequest) -> ChatChunkChoice:
    logprobs = None
    if body.logprobs:
        logprobs = _logprobs(update.completion, update.token_start, body.top_logprobs or 0)
    return ChatChunkChoice(
        index=update.index,
        delta=DeltaMessage(content=update.text) if update.text else DeltaMessage(),
        logprobs=logprobs,
        finish_reason=update.finish_reason,  # type: ignore[arg-type]
    )


async def _events(
    body: ChatCompletionRequest,
    model: str,
    request_id: str,
    prompt: Prompt,
    stream: OutputStream,
    timer: RequestTimer,
    tools: ToolSession,
) -> AsyncIterator[bytes]:
    tracker = DeltaTracker(stream.request_ids, body.n)
    latest: dict[str, RequestOutput] = {}
    try:
        for index in range(body.n):
            role = DeltaMessage(role="assistant", content="")
            yield _chunk(request_id, model, ChatChunkChoice(index=index, delta=role))
        while not stream.finished:
            outputs = await stream.next_outputs()
            timer.observe(outputs)
            latest.update((o.request_id, o) for o in outputs)
            for update in tracker.updates(outputs):
                for choice in tools.chunks(_delta_choice(update, body)):
                    yield _chunk(request_id, model, choice)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = usage_of([prompt], list(latest.values()))
            chunk = ChatCompletionChunk(id=request_id, model=model, choices=[], usage=usage)
            yield event(chunk)
    except Exception as exc:
        yield event(to_api_error(exc).body())
    yield DONE
