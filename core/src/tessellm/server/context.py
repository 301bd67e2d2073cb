"""What every route needs: the engine, the served names, limits, and request → engine input."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.entrypoints.llm import apply_chat_template
from tessellm.errors import InvalidRequestError
from tessellm.lora.request import LoRARequest
from tessellm.outputs import CompletionOutput, RequestOutput
from tessellm.sampling_params import SamplingParams
from tessellm.server.errors import APIError, bad_request
from tessellm.server.metrics import ServerMetrics
from tessellm.server.protocol import SamplingFields, Usage


@dataclass(slots=True)
class Prompt:
    text: str | None
    token_ids: list[int]
    first_piece: str | None = None  # the first token's text (it has no logprob to carry it)


@dataclass
class ServerContext:
    engine: AsyncLLMEngine
    model_names: list[str]
    model_root: str
    api_key: str | None = None
    # LoRA adapters served by name (--lora-modules, /v1/load_lora_adapter): a request's
    # ``model`` names one to run with it.
    lora_modules: dict[str, LoRARequest] = field(default_factory=dict)
    # This model's tool calling (a server of several models); None: the app's.
    tool_calling: Any = None
    metrics: ServerMetrics = field(init=False)
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine)
        config = self.engine.engine.model_config
        self.vocab_size = int(getattr(config, "vocab_size", 0) or len(self.engine.tokenizer))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str | None) -> str:
        """The served name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.model_names[0]
        if name not in self.model_names and name not in self.lora_modules:
            served = [*self.model_names, *self.lora_modules]
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{', '.join(repr(n) for n in served)}",
                param="model",
                code="model_not_found",
            )
        return name

    def lora_for(self, name: str) -> LoRARequest | None:
        """The adapter a served name stands for (None: the base model)."""
        return self.lora_modules.get(name)

    def token_budget(
        self, prompt_len: int, requested: int | None, explicit: bool, prompt_param: str
    ) -> int:
        """max_tokens for one prompt: an explicit request beyond the context is a 400 (as
        OpenAI and vLLM answer); an implicit default is clamped to the room left."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens, leaving no room to generate",
                param=prompt_param,
            )
        if requested is None:
            return room
        if requested > room:
            if not explicit:
                return room
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{prompt_len + requested} were requested ({prompt_len} in the prompt, "
                f"{requested} for the completion); reduce the prompt or max_tokens",
                param="max_tokens",
            )
        return requested

    def sampling_params(
        self,
        body: SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        bias: dict[int, float] | None = None
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise bad_request(
                        f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
                    ) from None
                if not 0 <= token < self.vocab_size:
                    raise bad_request(f"logit_bias token id {token} is out of range", "logit_bias")
                bias[token] = value
        try:
            return SamplingParams(
                n=body.n,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                min_p=body.min_p or 0.0,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty or 1.0,
                logit_bias=bias,
                seed=body.seed,
                max_tokens=max_tokens,
                min_tokens=min(body.min_tokens, max_tokens),
                stop=body.stop or None,
                stop_token_ids=body.stop_token_ids,
                ignore_eos=body.ignore_eos,
                include_stop_str_in_output=body.include_stop_str_in_output,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=body.skip_special_tokens,
            )
        except InvalidRequestError as exc:
            raise bad_request(str(exc)) from None

    async def completion_prompts(self, prompt: Any) -> list[Prompt]:
        """The prompts of a completions request: text, a list of texts, token ids, or a list
        of token-id lists. Tokenizing runs on the engine's front thread (``front_call``)."""
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [list(prompt)]
        else:
            items = list(prompt)

        def prepare(engine: Any) -> list[Prompt]:
            out = []
            for item in items:
                if isinstance(item, str):
                    out.append(Prompt(item, engine.tokenize(item)))
                else:
                    out.append(Prompt(None, list(item)))
            return out

        prompts = await self.engine.front_call(prepare)
        for p in prompts:
            if not p.token_ids:
                raise bad_request("the prompt is empty", param="prompt")
        return prompts

    async def fill_echo_texts(self, prompts: list[Prompt]) -> None:
        """Give each prompt its text and first token's text, as echo shows them."""

        def decode(engine: Any) -> None:
            for p in prompts:
                if p.text is None:
                    p.text = engine.tokenizer.decode(p.token_ids)
                p.first_piece = engine.tokenizer.decode(p.token_ids[:1])

        await self.engine.front_call(decode)

    async def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        def render(engine: Any) -> list[int]:
            from jinja2 import TemplateError

            try:
                return apply_chat_template(
                    engine.tokenizer,
                    messages,
                    add_generation_prompt=add_generation_prompt,
                    tools=tools,
                )
            except TemplateError as exc:  # e.g. a template that insists roles alternate
                message = f"the chat template rejected the messages: {exc}"
                raise InvalidRequestError(message) from None

        ids = await self.engine.front_call(render)
        if not ids:
            raise bad_request("the messages render to an empty prompt", param="messages")
        return ids


# Request scope keys of a server of several models (server/router.py): the context the
# request was routed to, and the models it holds until its response ends.
ROUTED_CONTEXT = "tessellm.routed_context"
LEASES = "tessellm.model_leases"


def get_context(request: Request) -> ServerContext:
    """The request's context: the one model's, or the one ``model_context`` routed it to."""
    return request.scope.get(ROUTED_CONTEXT) or request.app.state.ctx


async def model_context(request: Request, name: str | None) -> tuple[ServerContext, str]:
    """The context serving the request's ``model`` and the served name to answer with (a
    404 for a name not served). Several models: the router's, loaded if need be."""
    router = getattr(request.app.state, "router", None)
    if router is None:  # one model: no routing
        ctx: ServerContext = request.app.state.ctx
        return ctx, ctx.check_model(name)
    return await router.acquire(request.scope, name)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_of(prompts: list[Prompt], outputs: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@dataclass(slots=True)
class ChoiceUpdate:
    """What one choice gained since it was last reported."""

    index: int
    text: str
    completion: CompletionOutput
    token_start: int
    finish_reason: str | None
    output: RequestOutput


class DeltaTracker:
    """Turns cumulative outputs into increments per choice: new text, the tokens it covers,
    and the finish reason exactly once. Choice ``index`` = prompt number * n + completion."""

    def __init__(self, request_ids: list[str], n: int) -> None:
        self.prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self.n = n
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def updates(self, outputs: list[RequestOutput]) -> list[ChoiceUpdate]:
        result = []
        for out in outputs:
            base = self.prompt_index[out.request_id] * self.n
            for comp in out.outputs:
                index = base + comp.index
                if index in self.finished:
                    continue
                text = comp.text[self.sent_text.get(index, 0) :]
                if not text and comp.finish_reason is None:
                    continue
                start = self.sent_tokens.get(index, 0)
                self.sent_text[index] = len(comp.text)
                self.sent_tokens[index] = len(comp.token_ids)
                if comp.finish_reason is not None:
                    self.finished.add(index)
                result.append(ChoiceUpdate(index, text, comp, start, comp.finish_reason, out))
        return result
