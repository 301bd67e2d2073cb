"""Tool calling's set-up: which parser reads "auto" answers (``--tool-call-parser``, else
detected), the conversation and tools as chat templates read them, and the JSON schema of
a "required" answer. The request's handling is in ``tool_calls.py``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tessellm.errors import ConfigError, TessellmError
from tessellm.interfaces.tool_parser import ToolCallParser, tool_parameters
from tessellm.sampling_params import StructuredOutputsParams
from tessellm.server.context import ServerContext, get_context
from tessellm.server.errors import bad_request
from tessellm.server.protocol import ChatCompletionRequest, ChatMessage

PARSERS = "tool_call_parsers"
BACKENDS = "structured_output_backends"


# -- which parser serves "auto" -----------------------------------------------------------


@dataclass
class ToolCallingConfig:
    """``--tool-call-parser`` (``None``: detect) and ``--enable-auto-tool-choice``."""

    parser: str | None = None
    enable_auto_tool_choice: bool = False
    resolved: type[ToolCallParser] | None = field(default=None, init=False)
    resolved_yet: bool = field(default=False, init=False)


def _chat_template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use")
        return "\n".join(str(t) for t in template.values())
    return template or ""


def detect_parser(
    chat_template: str, architectures: Sequence[str]
) -> tuple[str, type[ToolCallParser]] | None:
    """The registered parser most sure that it reads this model's format (``None``)."""
    from tessellm.plugins import get_plugins

    plugins = get_plugins()
    best: tuple[int, str, type[ToolCallParser]] | None = None
    for name in plugins.names(PARSERS):
        try:
            cls = plugins.load(PARSERS, name)
        except TessellmError:  # a broken plugin: `tessellm plugins` says why
            continue
        if not (isinstance(cls, type) and issubclass(cls, ToolCallParser)):
            continue
        score = cls.detect(chat_template, architectures)
        if score > 0 and (best is None or score > best[0]):
            best = (score, name, cls)
    return None if best is None else (best[1], best[2])


def resolve_parser(ctx: ServerContext, config: ToolCallingConfig) -> type[ToolCallParser] | None:
    """The parser of ``tool_choice="auto"`` (named, else detected once); ``ConfigError``
    for a name no plugin registered."""
    if config.resolved_yet:
        return config.resolved
    from tessellm.plugins import get_plugins

    if config.parser is not None:
        check_parser_name(config.parser)
        config.resolved = get_plugins().load(PARSERS, config.parser)
    else:
        model_config = ctx.engine.engine.model_config
        architectures = list(getattr(model_config, "architectures", None) or [])
        found = detect_parser(_chat_template_text(ctx.engine.tokenizer), architectures)
        config.resolved = None if found is None else found[1]
    config.resolved_yet = True
    return config.resolved


def check_parser_name(name: str) -> None:
    """``ConfigError`` naming the known parsers when no plugin registered ``name``."""
    from tessellm.plugins import get_plugins

    plugins = get_plugins()
    if plugins.get(PARSERS, name) is None:
        raise ConfigError("--tool-call-parser: " + plugins.missing_message(PARSERS, name))


def configure_tool_calling(app: Any, parser: str | None, enable_auto_tool_choice: bool) -> str:
    """Set ``serve``'s tool-calling flags on ``app``; a ``ConfigError`` for an unknown
    parser, or for ``--enable-auto-tool-choice`` when no parser fits the model. Returns a
    line for the startup log."""
    config = ToolCallingConfig(parser, enable_auto_tool_choice)
    found = resolve_parser(app.state.ctx, config)
    if found is None and enable_auto_tool_choice:
        raise ConfigError(
            "--enable-auto-tool-choice: no tool-call parser recognises this model's chat "
            "template; name one with --tool-call-parser"
        )
    app.state.tool_calling = config
    if found is None:
        return "tool calls: tool_choice 'auto' unavailable (no parser fits the chat template)"
    return f"tool calls: tool_choice 'auto' read by the {found.name!r} parser"


def request_config(request: Request) -> ToolCallingConfig:
    # A server of several models keeps one per model (its chat template, its parser).
    config = getattr(get_context(request), "tool_calling", None)
    config = config or getattr(request.app.state, "tool_calling", None)
    if config is None:  # an app built without serve's flags: detect
        config = request.app.state.tool_calling = ToolCallingConfig()
    return config


# -- the conversation ---------------------------------------------------------------------


def _arguments(text: str) -> Any:
    # Templates write the arguments with tojson: a dict, or JSON text would be quoted
    # twice. Text that is not a JSON object (a model's broken call) is passed as it is.
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def template_messages(
    messages: Sequence[ChatMessage], parser: type[ToolCallParser] | None
) -> list[dict[str, Any]]:
    """The conversation as Hugging Face chat templates read it."""
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
        if m.role == "tool":
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
        out.append(message)
    return parser.prepare_messages(out) if parser is not None else out


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The request's tools as the chat template's ``tools`` (OpenAI's shape)."""
    if not body.tools:
        return None
    # As the client sent them: templates write them out with tojson.
    return [
        {"type": "function", "function": t.function.model_dump(exclude_none=True)}
        for t in body.tools
    ]


# -- the request's plan -------------------------------------------------------------------


def _hoisted(tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each tool's parameters without its ``$defs``, and all of them gathered: nested in
    the "required" schema, ``#/$defs/...`` references resolve from the root."""
    defs: dict[str, Any] = {}
    params = []
    for tool in tools:
        schema = tool_parameters(tool)
        for key in ("$defs", "definitions"):
            for def_name, value in (schema.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, value) != value:
                    raise bad_request(
                        f"tools: two tools define {key}/{def_name} differently; tool_choice "
                        "'required' puts their schemas in one",
                        param="tools",
                    )
        params.append(schema)
    return params, defs


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a "required" answer: ``[{"name": ..., "parameters": ...}]``."""
    params, defs = _hoisted(tools)
    calls = [
        {
            "type": "object",
            "properties": {"name": {"enum": [t["function"]["name"]]}, "parameters": p},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t, p in zip(tools, params, strict=True)
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return {**schema, **defs}


def check_tools(tools: list[dict[str, Any]]) -> None:
    seen = set()
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise bad_request(f"tools: the function name {name!r} is given twice", "tools")
        seen.add(name)
        params = tool["function"].get("parameters")
        if params is not None and params.get("type", "object") != "object":
            raise bad_request(
                f"tools[{i}].function.parameters must be a JSON schema of type 'object', "
                f"got type {params.get('type')!r}",
                param="tools",
            )


def backend_kinds(ctx: ServerContext, backend: str | None) -> tuple[str, ...]:
    """What the grammar backend this request would use compiles (``()`` for none)."""
    from tessellm.plugins import get_plugins

    manager = getattr(ctx.engine.engine, "structured", None)
    if manager is None:
        return ()
    try:
        name = manager.backend_name(StructuredOutputsParams(json_object=True, backend=backend))
        return tuple(get_plugins().load(BACKENDS, name).capabilities.kinds)
    except TessellmError:
        return ()


def parser_names() -> list[str]:
    from tessellm.plugins import get_plugins

    return sorted(get_plugins().names(PARSERS))
