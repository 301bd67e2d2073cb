"""What the structured-output conformance check feeds a backend: per grammar kind, a spec,
outputs in its language and a prefix whose next text breaks it (``Case``), and specs the kind
must refuse.

Apart from ``structured_output.py`` (which walks matchers through these) so that the test
data reads as one list, and a case for a new grammar kind is added here without touching how
matchers are checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tessellm.interfaces.structured_output import GrammarSpec

_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
_DOC = {"name": "Ada L.", "age": 36, "tags": ["x", "y z"]}
_CALL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
_TAG = {
    "type": "structural_tag",
    "structures": [{"begin": "<tool_call>", "schema": _CALL_SCHEMA, "end": "</tool_call>"}],
    "triggers": ["<tool_call>"],
}
_CHOICES = ["yes", "no", "maybe so", 'say "hi" \\ bye']
# A tiny grammar per syntax: a parenthesised sum of numbers.
GRAMMARS = {
    "ebnf": 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]+',
    "lark": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]+/',
}
BAD_GRAMMARS = {"ebnf": 'root ::= "(" undefined_rule ")"', "lark": 'start: "(" undefined_rule'}


@dataclass(frozen=True)
class Case:
    """A spec, outputs in its language, and a prefix whose next text breaks it."""

    label: str
    spec: GrammarSpec
    valid: tuple[str, ...]
    bad_prefix: str
    bad_next: str
    empty_ok: bool = False  # the empty output is in the language (eos allowed at once)


def cases_for(kind: str, syntax: str) -> list[Case]:
    """The cases of ``kind`` (``grammar``: in ``syntax``); none for an unknown syntax."""
    compact = json.dumps(_DOC, separators=(",", ":"))
    if kind == "json":
        # Properties in the schema's order: a backend may keep that order (xgrammar does).
        spec = GrammarSpec("json", json.dumps(_SCHEMA))
        tight = GrammarSpec("json", spec.value, any_whitespace=False)
        code = {"type": "string", "minLength": 2, "maxLength": 6}
        bounded = {"type": "object", "properties": {"code": code}, "required": ["code"]}
        bounded = GrammarSpec("json", json.dumps(bounded))
        return [
            Case("json", spec, (json.dumps(_DOC), compact), '{"name": "A", "age": ', "x"),
            # Compact output: whitespace outside strings is refused.
            Case("json compact", tight, (compact,), '{"name":"A",', " "),
            # A raw control character is not JSON, in a length-bounded string too.
            Case("json bounded string", bounded, ('{"code": "ab c"}',), '{"code": "a', "\t"),
        ]
    if kind == "json_object":
        text = '{"k": [1, 2.5, {"n": null}], "s": "v", "t": true}'
        return [Case("json_object", GrammarSpec("json_object", ""), (text,), "", "[")]
    if kind == "regex":
        spec = GrammarSpec("regex", r"[a-z]{2,5}-[0-9]{3}(\.[0-9]+)?")
        return [Case("regex", spec, ("abc-123.45", "xy-007"), "abc-12", "x")]
    if kind == "choice":
        spec = GrammarSpec("choice", json.dumps(_CHOICES))
        return [Case("choice", spec, tuple(_CHOICES), "ma", "x")]
    if kind == "grammar" and syntax in GRAMMARS:
        spec = GrammarSpec("grammar", GRAMMARS[syntax])
        return [Case(f"grammar ({syntax})", spec, ("(1+23)", "(7)"), "(1+", ")")]
    if kind == "structural_tag":
        spec = GrammarSpec("structural_tag", json.dumps(_TAG))
        call = '<tool_call>{"city": "Paris", "days": 3}</tool_call>'
        texts = (f"Sure. {call} Done.", "no call at all", call)
        return [Case("structural_tag", spec, texts, "ok <tool_call>", "?", empty_ok=True)]
    return []


def invalid_specs(kind: str, syntax: str) -> list[GrammarSpec]:
    """Specs each kind must refuse (an empty choice is refused upstream)."""
    bad_tag = {"begin": "<a>", "schema": {"type": "nope"}, "end": "</a>"}
    invalid = {
        "json": '{"type": "nope"}',
        "regex": "(",
        "grammar": BAD_GRAMMARS.get(syntax),
        "structural_tag": json.dumps({"structures": [bad_tag], "triggers": ["<a>"]}),
    }
    return [GrammarSpec(kind, invalid[kind])] if invalid.get(kind) else []
