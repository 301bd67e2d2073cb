"""An incremental scanner of one JSON tool-call object: ``{"name": ..., "arguments": {...}}``.

It reads the object a character at a time as text arrives and records where the parts
are: the tool's name (once its string is complete), where the arguments value starts and
ends, and where the object closes. Only the object's top level is checked against JSON's
grammar (keys, colons, commas); inside the arguments it only follows nesting and strings,
because the arguments are passed on as the model wrote them and a constrained call is
valid by construction.
"""

from __future__ import annotations

import json

WHITESPACE = " \t\r\n"
_SCALAR = frozenset("0123456789+-.eEtrufalsn")


class CallScanner:
    """Scans ``text[start:]`` for one call object; ``feed`` is called with the whole text
    so far (it only reads what it has not read yet)."""

    __slots__ = (
        "_argument_keys",
        "_escape",
        "_in_string",
        "_key",
        "_key_start",
        "_nesting",
        "_state",
        "_value_start",
        "arguments_end",
        "arguments_start",
        "arguments_text",
        "end",
        "error",
        "name",
        "pos",
    )

    def __init__(self, start: int, argument_keys: tuple[str, ...]) -> None:
        self.pos = start  # the next character to read
        self._argument_keys = argument_keys
        self._state = "open"
        self._escape = False
        self._in_string = False  # inside a string of a nested value
        self._nesting = 0
        self._key: str | None = None
        self._key_start = 0
        self._value_start = 0
        self.name: str | None = None
        # An object value: its span, streamable as it grows. A string value holding the
        # arguments' JSON (some models quote them) is decoded into arguments_text.
        self.arguments_start: int | None = None
        self.arguments_end: int | None = None
        self.arguments_text: str | None = None
        self.end: int | None = None  # just past the closing brace
        self.error = False

    @property
    def done(self) -> bool:
        return self.end is not None or self.error

    def feed(self, text: str) -> None:
        while self.pos < len(text) and not self.done:
            self._step(text, text[self.pos])

    def _fail(self) -> None:
        self.error = True

    def _step(self, text: str, ch: str) -> None:
        state = self._state
        if state in ("key", "string_value") or (state == "nested" and self._in_string):
            self.pos += 1
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                if state == "key":
                    self._key = self._decode(text[self._key_start : self.pos])
                    self._state = "colon"
                    if not isinstance(self._key, str):
                        self._fail()
                elif state == "string_value":
                    self._end_value(text, self.pos)
                else:
                    self._in_string = False
            return
        if state == "nested":
            self.pos += 1
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._nesting += 1
            elif ch in "}]":
                self._nesting -= 1
                if self._nesting == 0:
                    self._end_value(text, self.pos)
            return
        if state == "scalar":
            if ch in _SCALAR:
                self.pos += 1
            else:
                self._end_value(text, self.pos)  # the delimiter is read in the next state
            return
        if ch in WHITESPACE:
            self.pos += 1
            return
        ok = True
        if state == "open":
            ok = ch == "{"
            self._state = "first_key"
        elif state in ("first_key", "next_key"):
            if ch == '"':
                self._key_start = self.pos
                self._state = "key"
            elif ch == "}" and state == "first_key":
                self.end = self.pos + 1
            else:
                ok = False
        elif state == "colon":
            ok = ch == ":"
            self._state = "value"
        elif state == "value":
            self._value_start = self.pos
            if ch == '"':
                self._state = "string_value"
            elif ch in "{[":
                self._state = "nested"
                self._nesting = 1
                if ch == "{" and self._key in self._argument_keys:
                    self.arguments_start = self.pos
            elif ch in _SCALAR:
                self._state = "scalar"
            else:
                ok = False
        elif state == "after_value":
            if ch == ",":
                self._state = "next_key"
            elif ch == "}":
                self.end = self.pos + 1
            else:
                ok = False
        if not ok:
            self._fail()
            return
        self.pos += 1

    def _end_value(self, text: str, end: int) -> None:
        raw = text[self._value_start : end]
        self._state = "after_value"
        if self._key == "name":
            name = self._decode(raw)
            if not isinstance(name, str) or self.name is not None:
                self._fail()
                return
            self.name = name
        elif self._key in self._argument_keys:
            if self.arguments_start is not None and self.arguments_end is None:
                self.arguments_end = end
            elif self.arguments_start is None and self.arguments_text is None:
                decoded = self._decode(raw) if raw.startswith('"') else None
                if not isinstance(decoded, str) or not _is_object_text(decoded):
                    self._fail()
                    return
                self.arguments_text = decoded
            else:
                self._fail()  # the arguments given twice

    @staticmethod
    def _decode(raw: str) -> object:
        try:
            return json.loads(raw)
        except ValueError:
            return None


def _is_object_text(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
