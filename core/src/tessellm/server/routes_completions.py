"""``POST /v1/completions``: OpenAI's (legacy) text completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from tessellm.engine.async_engine import OutputStream
from tessellm.outputs import CompletionOutput, RequestOutput
from tessellm.server.auth import require_api_key
from tessellm.server.context import (
    ChoiceUpdate,
    DeltaTracker,
    Prompt,
    ServerContext,
    get_context,
    new_id,
    usage_of,
)
from tessellm.server.errors import bad_request, to_api_error
from tessellm.server.metrics import RequestTimer
from tessellm.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from tessellm.server.routes_common import ERROR_RESPONSES, collect_outputs
from tessellm.server.sse import DONE, EventStreamResponse, event, run_until_disconnect

router = APIRouter(dependencies=[Depends(require_api_key)])

DEFAULT_MAX_TOKENS = 16


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request(
            "echo together with logprobs is not supported (prompt logprobs are not computed)",
            param="echo",
        )
    prompts = await ctx.completion_prompts(body.prompt)
    request_id = new_id("cmpl")
    stream = ctx.engine.new_stream()
    try:
        await _submit(ctx, body, prompts, request_id, stream)
    except BaseException:
        stream.abort()
        raise
    timer = RequestTimer(ctx.metrics)
    if body.stream:
        events = _events(ctx, body, model, request_id, prompts, stream, timer)
        return EventStreamResponse(events, on_close=stream.abort)
    finished, outputs = await run_until_disconnect(request.receive, collect_outputs(stream, timer))
    if not finished:
        return Response(status_code=499)
    tracker = DeltaTracker(stream.request_ids, body.n)
    choices = [_choice(u, body, prompts) for u in tracker.updates(outputs)]
    choices.sort(key=lambda c: c.index)
    response = CompletionResponse(
        id=request_id, model=model, choices=choices, usage=usage_of(prompts, outputs)
    )
    return Response(response.model_dump_json(), media_type="application/json")


async def _submit(
    ctx: ServerContext,
    body: CompletionRequest,
    prompts: list[Prompt],
    request_id: str,
    stream: OutputStream,
) -> None:
    explicit = "max_tokens" in body.model_fields_set and body.max_tokens is not None
    requested = body.max_tokens if "max_tokens" in body.model_fields_set else DEFAULT_MAX_TOKENS
    for i, prompt in enumerate(prompts):
        max_tokens = ctx.token_budget(len(prompt.token_ids), requested, explicit, "prompt")
        params = ctx.sampling_params(body, max_tokens, body.logprobs)
        await stream.add(f"{request_id}-{i}", prompt.token_ids, params)
    if body.echo:
        for prompt in prompts:
            if prompt.text is None:
                prompt.text = await ctx.decode(prompt.token_ids)


def _prompt_of(update: ChoiceUpdate, body: CompletionRequest, prompts: list[Prompt]) -> Prompt:
    return prompts[update.index // body.n]


def _choice(
    update: ChoiceUpdate, body: CompletionRequest, prompts: list[Prompt]
) -> CompletionChoice:
    text = update.text
    if body.echo:
        text = (_prompt_of(update, body, prompts).text or "") + text
    return CompletionChoice(
        index=update.index,
        text=text,
        logprobs=_logprobs(update.completion, update.token_start, body.logprobs),
        finish_reason=update.finish_reason,  # type: ignore[arg-type]
        stop_reason=update.completion.stop_reason,
    )


def _logprobs(comp: CompletionOutput, start: int, top: int | None) -> CompletionLogprobs | None:
    if top is None or comp.logprobs is None:
        return None
    result = CompletionLogprobs()
    earlier = zip(comp.token_ids[:start], comp.logprobs, strict=False)
    offset = sum(len(_piece(entry, token_id)) for token_id, entry in earlier)
    for token_id, entry in zip(comp.token_ids[start:], comp.logprobs[start:], strict=False):
        piece = _piece(entry, token_id)
        result.tokens.append(piece)
        result.token_logprobs.append(entry[token_id].logprob)
        ranked = sorted(
            (e for e in entry.items() if e[1].rank is not None), key=lambda e: e[1].rank or 0
        )
        tops = {(lp.decoded_token or ""): lp.logprob for _, lp in ranked[:top]}
        tops.setdefault(piece, entry[token_id].logprob)
        result.top_logprobs.append(tops)
        result.text_offset.append(offset)
        offset += len(piece)
    return result


def _piece(entry: dict, token_id: int) -> str:
    return entry[token_id].decoded_token or ""


async def _events(
    ctx: ServerContext,
    body: CompletionRequest,
    model: str,
    request_id: str,
    prompts: list[Prompt],
    stream: OutputStream,
    timer: RequestTimer,
) -> AsyncIterator[bytes]:
    tracker = DeltaTracker(stream.request_ids, body.n)
    latest: dict[str, RequestOutput] = {}
    echoed: set[int] = set()
    try:
        while not stream.finished:
            outputs = await stream.next_outputs()
            timer.observe(outputs)
            latest.update((o.request_id, o) for o in outputs)
            for update in tracker.updates(outputs):
                choice = _choice(update, body, prompts)
                if body.echo and update.index in echoed:
                    choice.text = update.text  # the prompt goes out once, with the first chunk
                echoed.add(update.index)
                chunk = CompletionResponse(id=request_id, model=model, choices=[choice])
                yield event(chunk)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = usage_of(prompts, list(latest.values()))
            yield event(CompletionResponse(id=request_id, model=model, choices=[], usage=usage))
    except Exception as exc:
        yield event(to_api_error(exc).body())
    yield DONE
