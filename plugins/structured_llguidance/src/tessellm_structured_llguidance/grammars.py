"""Grammar specs as llguidance grammars (the text ``LLMatcher`` compiles).

llguidance takes every kind as one grammar document: JSON schemas and regexes through its
own constructors, choices and structural tags as Lark (llguidance's Lark dialect, with
``%json`` for inline schemas and ``lazy`` lexemes for triggers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import llguidance
from llguidance import LLMatcher

from tessellm.interfaces.structured_output import GrammarSpec

# Free text between structural tags: any valid UTF-8, newlines included. Special tokens
# are not text to llguidance (their bytes carry a 0xFF marker), so none can appear here.
_FREE_TEXT = r"/(.|\n)*/"


def grammar_for(spec: GrammarSpec, special_tokens: Mapping[str, int]) -> str:
    """The llguidance grammar for ``spec``; ``ValueError`` if its value is malformed.

    ``special_tokens`` maps the text of the tokenizer's special tokens (those llguidance
    does not treat as text) to their ids, so structural tags can match them as tokens.
    Whether the grammar itself is valid (a schema llguidance supports, a regex that
    parses) is only known when ``LLMatcher`` compiles it.
    """
    if spec.kind == "json":
        schema = _json(spec, "JSON schema")
        if not isinstance(schema, dict | bool):
            raise ValueError(f"JSON schema must be an object, not {type(schema).__name__}")
        return LLMatcher.grammar_from_json_schema(
            _schema_object(schema), defaults=_json_options(spec)
        )
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_json_options(spec))
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return LLMatcher.grammar_from_lark(_choice_lark(_json(spec, "choice")))
    if spec.kind == "grammar":
        if not spec.value.strip():
            raise ValueError("the grammar is empty")
        # grammar_from("grammar") takes Lark as it is and converts GBNF (``::=`` rules),
        # the syntax vLLM's users also send to this backend.
        return llguidance.grammar_from("grammar", spec.value)
    if spec.kind == "structural_tag":
        lark = structural_tag_lark(
            _json(spec, "structural_tag"), spec.any_whitespace, special_tokens
        )
        return LLMatcher.grammar_from_lark(lark)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def _json(spec: GrammarSpec, what: str) -> Any:
    try:
        return spec.json_value()
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def _json_options(spec: GrammarSpec) -> dict[str, Any]:
    return {"whitespace_flexible": spec.any_whitespace}


def _schema_object(schema: dict[str, Any] | bool) -> dict[str, Any]:
    # The boolean schemas: true accepts any JSON value, false none (nothing to generate).
    if schema is True:
        return {}
    if schema is False:
        raise ValueError("the JSON schema false accepts no value")
    return schema


def _choice_lark(choices: Any) -> str:
    if not isinstance(choices, list) or not choices:
        raise ValueError("choice must be a non-empty list of strings")
    if not all(isinstance(c, str) for c in choices):
        raise ValueError("choice must be a non-empty list of strings")
    # JSON string literals are valid Lark literals in llguidance, escapes included.
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def structural_tag_lark(tag: Any, any_whitespace: bool, special_tokens: Mapping[str, int]) -> str:
    """Lark for vLLM's structural tag: free text, and wherever a trigger appears, one of
    the structures that begin with it (``begin``, JSON per ``schema``, ``end``), then free
    text again.

    A trigger is a ``lazy`` lexeme (free text up to its first occurrence), llguidance's
    tool-calling idiom. A trigger that is a special token of the tokenizer (Qwen's
    ``<tool_call>``, which llguidance does not see as text) also matches as that token.
    """
    if not isinstance(tag, dict):
        raise ValueError("structural_tag must be a JSON object")
    structures = tag.get("structures")
    triggers = tag.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise ValueError("structural_tag needs a non-empty 'structures' list")
    if not isinstance(triggers, list) or not triggers:
        raise ValueError("structural_tag needs a non-empty 'triggers' list")
    if not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("structural_tag 'triggers' must be non-empty strings")

    bodies: dict[str, list[str]] = {}
    for i, structure in enumerate(structures):
        begin, schema, end = _structure(structure, i)
        matching = [t for t in triggers if begin.startswith(t)]
        if not matching:
            raise ValueError(
                f"structural_tag structure {i}: begin {begin!r} starts with none of the "
                f"triggers {triggers}"
            )
        trigger = max(matching, key=len)  # the most specific trigger owns the structure
        schema = dict(schema)
        schema["x-guidance"] = {
            "whitespace_flexible": any_whitespace,
            **schema.get("x-guidance", {}),
        }
        parts = [
            _literal(begin[len(trigger) :], special_tokens),
            "%json " + json.dumps(schema),
            _literal(end, special_tokens),
        ]
        bodies.setdefault(trigger, []).append(" ".join(p for p in parts if p))

    lines = [
        "%llguidance {}",
        "start: (" + " | ".join(f"tag_{k}" for k in range(len(bodies))) + ")* free",
    ]
    lines += ["free: FREE_TEXT", f"FREE_TEXT: {_FREE_TEXT}"]
    for k, (trigger, alternatives) in enumerate(bodies.items()):
        lines.append(f"trigger_{k}_text[lazy]: FREE_TEXT {json.dumps(trigger)}")
        token_id = special_tokens.get(trigger)
        if token_id is None:
            lines.append(f"trigger_{k}: trigger_{k}_text")
        else:
            lines.append(f"trigger_{k}: trigger_{k}_text | FREE_TEXT <[{token_id}]>")
        lines.append(f"tag_{k}: trigger_{k} (" + " | ".join(alternatives) + ")")
    return "\n".join(lines) + "\n"


def _structure(structure: Any, i: int) -> tuple[str, dict[str, Any], str]:
    if not isinstance(structure, dict):
        raise ValueError(f"structural_tag structure {i} must be an object")
    begin, schema, end = structure.get("begin"), structure.get("schema"), structure.get("end")
    if not isinstance(begin, str) or not isinstance(end, str):
        raise ValueError(f"structural_tag structure {i} needs string 'begin' and 'end'")
    if schema is None:
        schema = {}
    if not isinstance(schema, dict | bool):
        raise ValueError(f"structural_tag structure {i}: 'schema' must be a JSON schema object")
    return begin, _schema_object(schema), end


def _literal(text: str, special_tokens: Mapping[str, int]) -> str:
    """``text`` as a Lark sequence in which each special token's text also matches as
    the token itself (``</tool_call>`` spelled out or as Qwen's one token)."""
    if not text:
        return ""
    if not special_tokens:
        return json.dumps(text)
    pattern = re.compile(
        "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    )
    parts: list[str] = []
    pos = 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            parts.append(json.dumps(text[pos : match.start()]))
        parts.append(f"({json.dumps(match.group())} | <[{special_tokens[match.group()]}]>)")
        pos = match.end()
    if pos < len(text):
        parts.append(json.dumps(text[pos:]))
    return " ".join(parts)
