"""Tool-call formats that write each call as a JSON object ``{"name", "arguments"}``
after a marker: the base of the Hermes, Llama 3 and Mistral parsers (and of the server's
constrained ``tool_choice="required"`` answers).

The stream alternates between content and blocks of calls. In content it looks for a
block's start marker, holding back a tail that may be the start of one. In a block it
reads call objects with :class:`CallScanner`; a call is sent (id and name) once its name
is known to be one of the request's tools and its arguments object has begun, and its
arguments are then sent as they arrive. A block that turns out not to be a call before
that point (no JSON, an unknown tool) is given back as content, as the model wrote it.
Whitespace (and the format's separators) around calls is dropped from the content.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tessellm.interfaces.tool_parser import (
    ParsedDelta,
    Tool,
    ToolCallDelta,
    ToolCallParser,
    ToolCallStream,
    tool_parameters,
)
from tessellm.tool_parsers.json_scan import WHITESPACE, CallScanner


@dataclass(frozen=True, slots=True)
class JsonCallFormat:
    """Where call objects sit in the text.

    ``starts``: markers that open a block and are not part of the JSON (``<tool_call>``);
    ``payload_starts``: markers that are the beginning of the call object itself (Llama's
    ``{"name"``); ``end``: the marker closing each call's block (``</tool_call>``, optional
    in the text); ``lists``: a block may hold a JSON array of calls; ``separators``:
    characters dropped between calls besides whitespace; ``opens_in_block``: the text
    starts inside a block (a constrained answer that is only calls).
    """

    starts: tuple[str, ...] = ()
    payload_starts: tuple[str, ...] = ()
    end: str = ""
    lists: bool = False
    argument_keys: tuple[str, ...] = ("arguments", "parameters")
    separators: str = ""
    opens_in_block: bool = False


class _Content:
    """Content text with the whitespace next to calls dropped, whatever the chunking."""

    def __init__(self, separators: str) -> None:
        self.out = ""
        self.held = ""  # trailing whitespace: kept only if more content follows
        self.after_call = False
        self.saw_call = False
        self._drop = WHITESPACE + separators

    def emit(self, text: str) -> None:
        if self.after_call:
            text = text.lstrip(self._drop)
            if not text:
                return
            self.after_call = False
        body = text.rstrip(WHITESPACE)
        if body:
            self.out += self.held + body
            self.held = text[len(body) :]
        else:
            self.held += text

    def call_started(self) -> None:
        self.held = ""
        self.saw_call = True

    def finish(self) -> None:
        if not self.saw_call:
            self.out += self.held
        self.held = ""

    def take(self) -> str:
        out, self.out = self.out, ""
        return out


class JsonCallStream(ToolCallStream):
    def __init__(
        self, fmt: JsonCallFormat, tool_names: Sequence[str], new_id: Callable[[], str]
    ) -> None:
        self.fmt = fmt
        self.tool_names = set(tool_names)
        self.new_id = new_id
        self.text = ""  # everything fed so far
        self.pos = 0  # what is read
        self.content = _Content(fmt.separators)
        self.markers = fmt.starts + fmt.payload_starts
        self.calls = 0
        # In a block: where its uncommitted text starts (given back as content if the
        # block is not a call), the scanner of the current object, and its call's index.
        self.block_start: int | None = None
        self.in_list = False
        self.scanner: CallScanner | None = None
        self.current: int | None = None  # the index of the call being sent
        self.sent = 0  # position up to which the current call's arguments are sent
        self.state = "content"
        if fmt.opens_in_block:
            self.state = "block"
            self.block_start = 0

    def feed(self, text: str) -> ParsedDelta:
        self.text += text
        out = ParsedDelta()
        while self._advance(out):
            pass
        out.content = self.content.take()
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.current is None and self.block_start is not None:
            self.content.emit(self.text[self.block_start :])  # an unfinished non-call
        elif self.state == "content":
            self.content.emit(self.text[self.pos :])
        self.pos = len(self.text)
        self.content.finish()
        out.content = self.content.take()
        return out

    # -- the states; each returns whether it made progress --------------------------------

    def _advance(self, out: ParsedDelta) -> bool:
        if self.state == "content":
            return self._in_content()
        if self.state == "block":
            return self._block_next()
        if self.state == "call":
            return self._in_call(out)
        return self._after_call()

    def _in_content(self) -> bool:
        rest = self.text[self.pos :]
        found = [(rest.find(m), m) for m in self.markers]
        found = [(i, m) for i, m in found if i >= 0]
        if found:
            i, marker = min(found, key=lambda f: (f[0], -len(f[1])))
            self.content.emit(rest[:i])
            self.block_start = self.pos + i
            self.pos += i
            if marker in self.fmt.starts:
                self.pos += len(marker)
                self.state = "block"
            else:
                self._open_call()
            return True
        held = _partial_marker(rest, self.markers)
        self.content.emit(rest[: len(rest) - held])
        self.pos += len(rest) - held
        return False

    def _block_next(self) -> bool:
        """At the start of a block, or after a comma in a list: the next object."""
        self._skip_whitespace()
        if self.pos >= len(self.text):
            return False
        ch = self.text[self.pos]
        if ch == "[" and self.fmt.lists and not self.in_list:
            self.in_list = True
            self.pos += 1
            return True
        if ch == "{":
            self._open_call()
            return True
        self._not_a_call()
        return True

    def _open_call(self) -> None:
        self.scanner = CallScanner(self.pos, self.fmt.argument_keys)
        self.current = None
        self.state = "call"

    def _in_call(self, out: ParsedDelta) -> bool:
        scanner = self.scanner
        assert scanner is not None
        before = scanner.pos
        scanner.feed(self.text)
        if scanner.error:
            if self.current is None:
                self._not_a_call(scanner.pos)
            else:  # a sent call that goes wrong after its arguments: it ends there
                self._close_call(scanner.pos)
            return True
        if self.current is None and scanner.name is not None:
            if scanner.name not in self.tool_names:
                self._not_a_call(scanner.pos)
                return True
            ready = scanner.arguments_start is not None or scanner.arguments_text is not None
            if ready or scanner.end is not None:
                self._send_header(out, scanner.name)
                self.sent = scanner.arguments_start or 0
        if self.current is not None:
            self._send_arguments(out, scanner)
        if scanner.end is not None:
            if self.current is None:  # an object without a name
                self._not_a_call(scanner.end)
            else:
                self._close_call(scanner.end)
            return True
        return scanner.pos != before

    def _send_header(self, out: ParsedDelta, name: str) -> None:
        self.current = self.calls
        self.calls += 1
        self.content.call_started()
        out.tool_calls.append(ToolCallDelta(self.current, "", self.new_id(), name))

    def _send_arguments(self, out: ParsedDelta, scanner: CallScanner) -> None:
        assert self.current is not None
        if scanner.arguments_start is not None:
            end = scanner.arguments_end if scanner.arguments_end is not None else scanner.pos
            if end > self.sent:
                out.add_arguments(self.current, self.text[self.sent : end])
                self.sent = end
        elif scanner.end is not None and self.sent == 0:
            out.add_arguments(self.current, scanner.arguments_text or "{}")
            self.sent = scanner.end

    def _close_call(self, end: int) -> None:
        self.pos = end
        self.scanner = None
        self.current = None
        self.block_start = None
        self.state = "after_call"
        self.content.after_call = True

    def _after_call(self) -> bool:
        """After an object: the list goes on or ends, or the block's end marker follows."""
        self._skip_whitespace()
        rest = self.text[self.pos :]
        if not rest:
            return False
        if self.in_list:
            if rest[0] == ",":
                self.block_start = self.pos  # the comma is content if no call follows
                self.pos += 1
                self.state = "block"
                return True
            self.in_list = False
            if rest[0] == "]":
                self.pos += 1
        elif self.fmt.end:
            if rest.startswith(self.fmt.end):
                self.pos += len(self.fmt.end)
            elif self.fmt.end.startswith(rest):
                return False  # maybe the end marker, not complete yet
        self.state = "content"
        return True

    def _not_a_call(self, upto: int | None = None) -> None:
        """The block is not a call: its text so far is content, read on from ``upto``."""
        assert self.block_start is not None
        upto = max(upto if upto is not None else self.pos, self.block_start + 1)
        self.content.emit(self.text[self.block_start : upto])
        self.pos = upto
        self.block_start = None
        self.scanner = None
        self.in_list = False
        self.state = "content"

    def _skip_whitespace(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in WHITESPACE:
            self.pos += 1


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest tail of ``text`` that begins one of ``markers``."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-size:]):
                best = size
                break
    return best


class JsonToolCallParser(ToolCallParser):
    """A parser for a :class:`JsonCallFormat`. The structural tag writes each call as
    ``begin`` (a call prefix, the tool's name, ``arguments_prefix``), the arguments object,
    then ``call_suffix``; one structure per tool and call prefix. Each call prefix starts
    with one of ``triggers`` (default: the parser's ``trigger`` alone)."""

    format: ClassVar[JsonCallFormat] = JsonCallFormat()
    call_prefixes: ClassVar[tuple[str, ...]] = ('{"name": ',)
    triggers: ClassVar[tuple[str, ...]] = ()
    arguments_prefix: ClassVar[str] = ', "arguments": '
    call_suffix: ClassVar[str] = "}"

    def structural_tag(self) -> dict[str, Any]:
        import json

        structures = [
            {
                "begin": f"{prefix}{json.dumps(name)}{self.arguments_prefix}",
                "schema": tool_parameters(tool),
                "end": self.call_suffix,
            }
            for prefix in self.call_prefixes
            for name, tool in zip(self.tool_names, self.tools, strict=True)
        ]
        return {
            "type": "structural_tag",
            "structures": structures,
            "triggers": list(self.triggers or (self.trigger,)),
        }

    def new_stream(self) -> ToolCallStream:
        return JsonCallStream(self.format, self.tool_names, self.new_call_id)


def streamed(parser_cls: type[JsonToolCallParser], tools: Sequence[Tool]) -> JsonCallStream:
    """A stream of ``parser_cls`` for ``tools`` (a shortcut for tests and tools)."""
    stream = parser_cls(tools).new_stream()
    assert isinstance(stream, JsonCallStream)
    return stream
