"""Tool calling on ``/v1/chat/completions``: OpenAI's ``tools`` and ``tool_choice``.

- The conversation: assistant messages' ``tool_calls`` reach the chat template in the
  shape Hugging Face templates read (``function.arguments`` a dict, not JSON text), tool
  messages with their ``tool_call_id``; the tools are the template's ``tools``.
- ``tool_choice="required"`` and a named function constrain the whole answer with a JSON
  schema built from the tools (the same for every family, as vLLM does): ``required``
  an array of ``{"name", "parameters"}`` objects (one unless ``parallel_tool_calls``),
  a named function its parameters. The answer is read into ``tool_calls``.
- ``"auto"`` (the default with tools): the model's family's
  :class:`~tessellm.interfaces.tool_parser.ToolCallParser` (``--tool-call-parser``, else
  detected from the chat template and architecture) reads calls out of the text; where the
  grammar backend compiles structural tags, a call is constrained from its trigger on.
- ``"none"``: the tools are shown to the template, the answer is text.

Answers with calls have ``finish_reason="tool_calls"`` (``"length"`` stays: a call cut by
``max_tokens``) and ``content`` null unless the model wrote text too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from tessellm.interfaces.tool_parser import (
    ParsedDelta,
    ToolCallDelta,
    ToolCallParser,
    ToolCallStream,
    new_call_id,
    tool_parameters,
)
from tessellm.sampling_params import SamplingParams
from tessellm.server.context import ServerContext, get_context
from tessellm.server.errors import bad_request
from tessellm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    DeltaMessage,
)
from tessellm.server.protocol_tools import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallOut,
    NamedToolChoice,
    ToolCallOut,
)
from tessellm.server.structured import Constraint, request_backend, request_constraints
from tessellm.server.tool_setup import (
    backend_kinds,
    check_tools,
    parser_names,
    request_config,
    required_schema,
    resolve_parser,
    template_messages,
    template_tools,
)
from tessellm.tool_parsers.json_calls import JsonCallFormat, JsonCallStream

# The constrained "required" answer: a JSON array of calls.
REQUIRED_FORMAT = JsonCallFormat(lists=True, opens_in_block=True)


class NamedCallStream(ToolCallStream):
    """A constrained named-function answer: the whole text is the arguments."""

    def __init__(self, name: str, call_id: str) -> None:
        self.name = name
        self.call_id = call_id
        self.started = False

    def _start(self, out: ParsedDelta) -> None:
        if not self.started:
            self.started = True
            out.tool_calls.append(ToolCallDelta(0, "", self.call_id, self.name))

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self._start(out)
        out.add_arguments(0, text)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        self._start(out)
        return out


@dataclass
class ToolSession:
    """One request's tool calling: what the template gets, the constraint, and a reader
    per choice that turns the generated text into content and calls."""

    mode: str  # "off" (no tools), "none", "auto", "required", "named"
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    parser: ToolCallParser | None = None
    named: str | None = None
    constraints: list[Constraint] = field(default_factory=list)
    eos_texts: tuple[str, ...] = ()
    keep_special_tokens: bool = False
    max_calls: int = 1 << 30
    readers: dict[int, _Reader] = field(default_factory=dict)

    @property
    def reads_calls(self) -> bool:
        return self.mode in ("auto", "required", "named")

    def adjust(self, params: SamplingParams) -> SamplingParams:
        if self.keep_special_tokens and params.skip_special_tokens:
            return replace(params, skip_special_tokens=False)
        return params

    def _stream(self) -> ToolCallStream:
        if self.mode == "named":
            assert self.named is not None
            return NamedCallStream(self.named, new_call_id())
        if self.mode == "required":
            names = [t["function"]["name"] for t in self.tools or ()]
            return JsonCallStream(REQUIRED_FORMAT, names, new_call_id)
        assert self.parser is not None
        return self.parser.new_stream()

    def _reader(self, index: int) -> _Reader:
        reader = self.readers.get(index)
        if reader is None:
            reader = _Reader(self._stream(), self.eos_texts, self.max_calls)
            self.readers[index] = reader
        return reader

    def shape(self, choice: ChatChoice) -> ChatChoice:
        """A whole answer's choice with its calls read out of its text."""
        if not self.reads_calls:
            return choice
        reader = self._reader(choice.index)
        delta = reader.feed(choice.message.content or "", choice.finish_reason)
        calls: list[ToolCallOut] = []
        for item in delta.tool_calls:
            if item.id is not None:
                calls.append(
                    ToolCallOut(
                        id=item.id, function=FunctionCallOut(name=item.name or "", arguments="")
                    )
                )
            calls[item.index].function.arguments += item.arguments
        content = delta.content if delta.content or not calls else None
        choice.message = AssistantMessage(content=content, tool_calls=calls or None)
        choice.finish_reason = reader.finish_reason(choice.finish_reason)  # type: ignore[assignment]
        return choice

    def chunks(self, choice: ChatChunkChoice) -> list[ChatChunkChoice]:
        """A stream chunk's choice as the chunks to send: content, then call deltas, the
        logprobs on the first and the finish reason on the last."""
        if not self.reads_calls:
            return [choice]
        reader = self._reader(choice.index)
        delta = reader.feed(choice.delta.content or "", choice.finish_reason)
        out = []
        if delta.content:
            out.append(
                ChatChunkChoice(index=choice.index, delta=DeltaMessage(content=delta.content))
            )
        for item in delta.tool_calls:
            function = DeltaFunctionCall(name=item.name, arguments=item.arguments)
            call = DeltaToolCall(index=item.index, id=item.id, function=function)
            if item.id is not None:
                call.type = "function"
            out.append(ChatChunkChoice(index=choice.index, delta=DeltaMessage(tool_calls=[call])))
        if choice.finish_reason is not None:
            reason = reader.finish_reason(choice.finish_reason)
            end = ChatChunkChoice(index=choice.index, delta=DeltaMessage())
            end.finish_reason = reason  # type: ignore[assignment]
            out.append(end)
        if choice.logprobs is not None:
            if not out:
                out.append(ChatChunkChoice(index=choice.index, delta=DeltaMessage()))
            out[0].logprobs = choice.logprobs
        return out


class _Reader:
    """One choice's stream, fed the engine's text increments."""

    def __init__(self, stream: ToolCallStream, eos_texts: tuple[str, ...], max_calls: int) -> None:
        self.stream = stream
        self.eos_texts = eos_texts
        self.max_calls = max_calls
        self.calls = 0

    def feed(self, text: str, finish_reason: str | None) -> ParsedDelta:
        if finish_reason == "stop":
            # Kept special tokens include the end-of-sequence token's text: not the answer's.
            for eos in self.eos_texts:
                if eos and text.endswith(eos):
                    text = text[: -len(eos)]
                    break
        delta = self.stream.feed(text)
        if finish_reason is not None:
            delta.extend(self.stream.finish())
        # Without parallel_tool_calls an "auto" answer keeps its first call.
        delta.tool_calls = [d for d in delta.tool_calls if d.index < self.max_calls]
        self.calls += sum(1 for d in delta.tool_calls if d.id is not None)
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason


def tool_session(request: Request, body: ChatCompletionRequest) -> ToolSession:
    """The request's tool calling; a 400 for tools or a ``tool_choice`` that do not fit."""
    ctx = get_context(request)
    config = request_config(request)
    parser_cls = resolve_parser(ctx, config)
    messages = template_messages(body.messages, parser_cls)
    tools = template_tools(body)
    choice = body.tool_choice
    if tools is None:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return ToolSession("off", messages)
    check_tools(tools)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            known = ", ".join(repr(t["function"]["name"]) for t in tools)
            raise bad_request(
                f"tool_choice names the function {name!r}, which is not among the tools ({known})",
                param="tool_choice",
            )
        schema = Constraint(f"tools (tool_choice function {name!r})", "json", tool_parameters(tool))
        return ToolSession("named", messages, tools, named=name, constraints=[schema])
    mode = choice or "auto"
    if mode == "none":
        return ToolSession("none", messages, tools)
    if mode == "required":
        schema = required_schema(tools, body.parallel_tool_calls)
        constraint = Constraint("tools (tool_choice 'required')", "json", schema)
        return ToolSession("required", messages, tools, constraints=[constraint])
    if parser_cls is None:
        raise bad_request(
            "tool_choice 'auto' needs a tool-call parser, and none recognises this model's "
            f"chat template (known: {', '.join(parser_names()) or 'none'}); start the server "
            "with --tool-call-parser NAME, or ask for tool_choice 'required' or a function",
            param="tool_choice",
        )
    parser = parser_cls(tools)
    constraints = []
    # A request's own response_format wins; then calls are read but not constrained.
    if not request_constraints(body) and "structural_tag" in backend_kinds(
        ctx, request_backend(body)
    ):
        tag = json.dumps(parser.structural_tag())
        constraints.append(
            Constraint("tools (tool calls of tool_choice 'auto')", "structural_tag", tag)
        )
    return ToolSession(
        "auto",
        messages,
        tools,
        parser=parser,
        constraints=constraints,
        eos_texts=_eos_texts(ctx) if parser.keep_special_tokens else (),
        keep_special_tokens=parser.keep_special_tokens,
        max_calls=(1 << 30) if body.parallel_tool_calls else 1,
    )


def _eos_texts(ctx: ServerContext) -> tuple[str, ...]:
    tokenizer = ctx.engine.tokenizer
    ids = getattr(ctx.engine.engine, "eos_token_ids", None) or [tokenizer.eos_token_id]
    tokens = tokenizer.convert_ids_to_tokens([i for i in ids if i is not None])
    return tuple(t for t in tokens if t)
