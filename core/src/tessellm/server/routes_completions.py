"""``POST /v1/completions``: OpenAI's (legacy) text completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from tessellm.engine.async_engine import OutputStream
from tessellm.lora.request import LoRARequest
from tessellm.outputs import CompletionOutput, Logprob, RequestOutput
from tessellm.server.auth import require_api_key
from tessellm.server.context import (
    ChoiceUpdate,
    DeltaTracker,
    Prompt,
    ServerContext,
    model_context,
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
from tessellm.server.structured import constrain

router = APIRouter(dependencies=[Depends(require_api_key)])

DEFAULT_MAX_TOKENS = 16


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx, model = await model_context(request, body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", param="best_of")
    prompts = await ctx.completion_prompts(body.prompt)
    request_id = new_id("cmpl")
    stream = ctx.engine.new_stream()
    try:
        await _submit(ctx, body, prompts, request_id, stream, ctx.lora_for(model))
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
    choices = [_choice(u, body, prompts, True) for u in tracker.updates(outputs)]
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
    lora_request: LoRARequest | None = None,
) -> None:
    explicit = "max_tokens" in body.model_fields_set and body.max_tokens is not None
    requested = body.max_tokens if "max_tokens" in body.model_fields_set else DEFAULT_MAX_TOKENS
    # echo with logprobs scores the prompt too, as OpenAI's legacy API does.
    prompt_logprobs = body.logprobs if body.echo else None
    for i, prompt in enumerate(prompts):
        max_tokens = ctx.token_budget(len(prompt.token_ids), requested, explicit, "prompt")
        params = ctx.sampling_params(body, max_tokens, body.logprobs, prompt_logprobs)
        params = await constrain(ctx, body, params)
        await stream.add(f"{request_id}-{i}", prompt.token_ids, params, lora_request=lora_request)
    if body.echo:
        await ctx.fill_echo_texts(prompts)


def _choice(
    update: ChoiceUpdate, body: CompletionRequest, prompts: list[Prompt], with_prompt: bool
) -> CompletionChoice:
    """One choice's increment; ``with_prompt`` puts the echoed prompt in front of it."""
    prompt = prompts[update.index // body.n]
    echo = body.echo and with_prompt
    logprobs = None
    if body.logprobs is not None:
        logprobs = CompletionLogprobs()
        if echo:
            _add_prompt_logprobs(logprobs, prompt, update.output, body.logprobs)
        base = len(prompt.text or "") if body.echo else 0
        _add_logprobs(logprobs, update.completion, update.token_start, body.logprobs, base)
    return CompletionChoice(
        index=update.index,
        text=(prompt.text or "") + update.text if echo else update.text,
        logprobs=logprobs,
        finish_reason=update.finish_reason,  # type: ignore[arg-type]
        stop_reason=update.completion.stop_reason,
    )


def _append(
    result: CompletionLogprobs, entry: dict[int, Logprob], token: int, top: int, offset: int
) -> int:
    """Add one token's logprobs at text ``offset``; returns the offset after it."""
    piece = entry[token].decoded_token or ""
    ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
    tops = {(lp.decoded_token or ""): lp.logprob for lp in ranked[:top]}
    tops.setdefault(piece, entry[token].logprob)
    result.tokens.append(piece)
    result.token_logprobs.append(entry[token].logprob)
    result.top_logprobs.append(tops)
    result.text_offset.append(offset)
    return offset + len(piece)


def _add_prompt_logprobs(
    result: CompletionLogprobs, prompt: Prompt, output: RequestOutput, top: int
) -> None:
    # The first prompt token has nothing before it to be predicted from: null, as OpenAI.
    first = prompt.first_piece or ""
    result.tokens.append(first)
    result.token_logprobs.append(None)
    result.top_logprobs.append(None)
    result.text_offset.append(0)
    offset = len(first)
    scored = output.prompt_logprobs or []
    for token, entry in zip(prompt.token_ids[1:], scored[1:], strict=False):
        if entry is not None:
            offset = _append(result, entry, token, top, offset)


def _add_logprobs(
    result: CompletionLogprobs, comp: CompletionOutput, start: int, top: int, base: int
) -> None:
    """The completion's tokens from ``start``; offsets count from ``base`` (the end of an
    echoed prompt, or 0)."""
    if comp.logprobs is None:
        return
    earlier = zip(comp.token_ids[:start], comp.logprobs[:start], strict=False)
    offset = base + sum(len(e[t].decoded_token or "") for t, e in earlier)
    for token, entry in zip(comp.token_ids[start:], comp.logprobs[start:], strict=False):
        offset = _append(result, entry, token, top, offset)


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
                # The echoed prompt goes out once, with each choice's first chunk.
                choice = _choice(update, body, prompts, update.index not in echoed)
                echoed.add(update.index)
                chunk = CompletionResponse(id=request_id, model=model, choices=[choice])
                yield event(chunk)
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = usage_of(prompts, list(latest.values()))
            yield event(CompletionResponse(id=request_id, model=model, choices=[], usage=usage))
    except Exception as exc:
        yield event(to_api_error(exc).body())
    yield DONE
