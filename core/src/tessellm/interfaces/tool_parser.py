"""The tool-call seam: reading a model family's tool calls out of its generated text.

A chat template that supports tools teaches the model a format for calls: Qwen and Hermes
write ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, Llama 3.1 a bare
``{"name": ..., "parameters": ...}``, Mistral ``[TOOL_CALLS] [{...}]``. A
:class:`ToolCallParser` (``register_tool_call_parsers``; ``--tool-call-parser`` names one)
knows one format. It serves ``tool_choice="auto"``, where the model decides between text
and calls:

- ``detect`` says whether it is the format of a model (its chat template's text and its
  architectures), so the server picks a parser without being told;
- ``trigger`` is the text that starts a call and ``structural_tag`` the constraint (vLLM's
  structural-tag shape) that the grammar backend enforces once the trigger appears: the
  text before stays free, the call itself is valid JSON for the tool's schema;
- ``new_stream`` reads calls out of the text as it is generated: content deltas until a
  call starts, then one :class:`ToolCallDelta` with the call's id and name, then the
  arguments as they come (the official SDK's ``delta.tool_calls`` chunks). ``parse``
  reads a whole text through the same stream, so streamed and whole answers agree.

A parser is built per request with the request's tools (OpenAI's
``{"type": "function", "function": {"name", "description", "parameters"}}`` dicts), so it
can refuse calls to tools that were not offered: such text stays content.

``tool_choice="required"`` and a named function do not use these parsers: they constrain
the whole answer to a JSON form that is the same for every family.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

Tool = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete call: ``arguments`` is the JSON text of the arguments object, as the
    model wrote it (OpenAI's ``function.arguments``)."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ToolCallDelta:
    """What a stream learned about call number ``index`` (OpenAI's ``delta.tool_calls[]``):
    the first delta of a call has ``id`` and ``name`` (and ``arguments=""``); later ones
    only an ``arguments`` fragment to append."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class ParsedDelta:
    """Content text and tool-call deltas found in one piece of generated text."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add_arguments(self, index: int, fragment: str) -> None:
        """Append an arguments fragment, merged into the previous fragment of the same call
        (one delta per call per chunk; a header delta stays on its own)."""
        if not fragment:
            return
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == index and last.id is None:
            last.arguments += fragment
        else:
            self.tool_calls.append(ToolCallDelta(index, fragment))

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        for delta in other.tool_calls:
            if delta.id is None:
                self.add_arguments(delta.index, delta.arguments)
            else:
                self.tool_calls.append(delta)


@dataclass(slots=True)
class ParsedOutput:
    """A whole answer read by a parser: ``content`` is ``None`` when the answer is only
    calls (OpenAI's shape)."""

    content: str | None
    tool_calls: list[ToolCall]


class ToolCallStream(ABC):
    """Incremental reading of one answer (one per choice; not thread-safe)."""

    @abstractmethod
    def feed(self, text: str) -> ParsedDelta:
        """Read the next piece of generated text. Text that may still turn out to start a
        call is held back until it is clear (at most a trigger's length)."""

    @abstractmethod
    def finish(self) -> ParsedDelta:
        """The answer is complete: release what was held back. A call cut short after its
        name was sent keeps its arguments as generated (``finish_reason`` tells)."""


class ToolCallParser(ABC):
    """One tool-call format. Subclasses set the class attributes and the two methods."""

    name: ClassVar[str] = ""
    # Hugging Face architectures whose models use this format by default; a chat template
    # marker (below) takes precedence, because fine-tunes change formats, not layers.
    architectures: ClassVar[tuple[str, ...]] = ()
    # Text only a chat template of this format contains (e.g. "<tool_call>").
    template_markers: ClassVar[tuple[str, ...]] = ()
    # The text that starts a call: the structural tag's trigger.
    trigger: ClassVar[str] = ""
    # The format's markers are special tokens that detokenizing would drop by default.
    keep_special_tokens: ClassVar[bool] = False

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = list(tools)
        self.tool_names = [str(t["function"]["name"]) for t in self.tools]

    @classmethod
    def detect(cls, chat_template: str | None, architectures: Sequence[str]) -> int:
        """How sure it is that a model uses this format: 2 for a chat template marker, 1 for
        a listed architecture (templates without tools still say nothing), 0 for no."""
        if chat_template and any(m in chat_template for m in cls.template_markers):
            return 2
        if (
            chat_template
            and "tools" in chat_template
            and set(architectures) & set(cls.architectures)
        ):
            return 1
        return 0

    @classmethod
    def prepare_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adapt a conversation (Hugging Face's message dicts) to what the family's chat
        template insists on, e.g. the length of call ids."""
        return messages

    def new_call_id(self) -> str:
        """An id for a call the model made."""
        return new_call_id()

    @abstractmethod
    def structural_tag(self) -> dict[str, Any]:
        """vLLM's structural tag constraining a call to this request's tools:
        ``{"type": "structural_tag", "structures": [{"begin", "schema", "end"}, ...],
        "triggers": [trigger]}``, one structure per tool whose ``begin`` starts with the
        trigger and names the tool, ``schema`` its parameters."""

    @abstractmethod
    def new_stream(self) -> ToolCallStream:
        """A reader for one answer."""

    def parse(self, text: str) -> ParsedOutput:
        """Read a whole answer (through a stream, so streamed answers read the same)."""
        stream = self.new_stream()
        delta = stream.feed(text)
        delta.extend(stream.finish())
        calls: list[ToolCall] = []
        for item in delta.tool_calls:
            if item.id is not None:
                calls.append(ToolCall(item.id, item.name or "", item.arguments))
            else:
                last = calls[item.index]
                calls[item.index] = ToolCall(last.id, last.name, last.arguments + item.arguments)
        content = delta.content if delta.content or not calls else None
        return ParsedOutput(content, calls)


def new_call_id() -> str:
    """A call id as OpenAI makes them: ``call_`` and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


def tool_parameters(tool: Tool) -> dict[str, Any]:
    """A tool's parameters schema (an empty object schema when it has none)."""
    params = tool["function"].get("parameters")
    return dict(params) if params else {"type": "object", "properties": {}}
