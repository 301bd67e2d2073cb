"""The llguidance backend: the conformance check, then outputs produced by walking random
allowed tokens from its bitmasks (JSON schemas, regexes, choices, a Lark grammar,
structural tags) checked by independent validators, and invalid specs refused."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from so_llguidance_walk import EOS, backend, byte_tokenizer, walk

from tessellm.interfaces.structured_output import GrammarSpec
from tessellm.testing import check_structured_output_backend
from tessellm_structured_llguidance.backend import LLGuidanceBackend


def test_conformance():
    result = check_structured_output_backend("llguidance")
    result.raise_for_failures()
    assert result.passed and not result.skipped


def test_capabilities():
    caps = LLGuidanceBackend.capabilities
    assert set(caps.kinds) == {
        "json",
        "json_object",
        "regex",
        "choice",
        "grammar",
        "structural_tag",
    }
    assert caps.grammar_syntax == "lark"


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "active": {"type": "boolean"},
                },
                "required": ["id", "active"],
                "additionalProperties": False,
            },
            "note": {"type": ["string", "null"], "maxLength": 12},
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3, None]},
            "kind": {"const": "fixed"},
        },
        "required": ["color", "size", "kind"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2},
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "exclusiveMaximum": 10},
                "minItems": 1,
                "maxItems": 4,
            },
        },
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20},
        },
        "required": ["ratio", "count"],
        "additionalProperties": False,
    },
    "top-level array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "string", "maxLength": 4}, "v": {"type": "integer"}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("any_whitespace", [True, False])
def test_json_schema_walks_validate(name, any_whitespace):
    schema = SCHEMAS[name]
    compiled = backend().compile(GrammarSpec("json", json.dumps(schema), any_whitespace))
    for seed in range(3):
        text = walk(compiled, seed)
        jsonschema.validate(json.loads(text), schema)
        if not any_whitespace:
            # Compact: no whitespace outside strings.
            assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', text)), text


def test_json_object_walks_parse_as_objects():
    compiled = backend().compile(GrammarSpec("json_object", ""))
    for seed in range(4):
        assert isinstance(json.loads(walk(compiled, seed)), dict)


@pytest.mark.parametrize(
    "pattern",
    [
        r"[a-z]{2,5}-[0-9]{3}(\.[0-9]+)?",
        r"(cat|dog|bird)s? [0-9]{1,2}",
        r"[A-Z][a-z]*@[a-z]+\.(com|org)",
    ],
)
def test_regex_walks_match(pattern):
    compiled = backend().compile(GrammarSpec("regex", pattern))
    for seed in range(4):
        text = walk(compiled, seed)
        assert re.fullmatch(pattern, text), text


def test_choice_walks_pick_one_choice():
    choices = ["maybe", "maybe so", "no", 'say "hi" \\ bye', "naïve 😀", "a\nb"]
    compiled = backend().compile(GrammarSpec("choice", json.dumps(choices)))
    seen = {walk(compiled, seed) for seed in range(24)}
    assert seen <= set(choices)
    assert len(seen) >= 3  # the walks reach several choices, not one forced path
    for choice in choices:  # each choice, spelled out token by token, is accepted
        matcher = compiled.new_matcher()
        assert all(matcher.accept_token(t) for t in byte_tokenizer().encode(choice))
        assert matcher.accept_token(EOS) and matcher.is_terminated()


ARITHMETIC = """
start: expr
expr: term (OP term)*
term: NUM | "(" expr ")"
OP: "+" | "-" | "*"
NUM: /[0-9]{1,3}/
"""


def _is_arithmetic(text: str) -> bool:
    # An independent recursive-descent parser of the grammar above.
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-*":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if m := re.match(r"[0-9]{1,3}", text[pos:]):
            pos += m.end()
            return True
        if text[pos : pos + 1] == "(":
            pos += 1
            if not expr() or text[pos : pos + 1] != ")":
                return False
            pos += 1
            return True
        return False

    return expr() and pos == len(text)


def test_lark_grammar_walks_parse():
    compiled = backend().compile(GrammarSpec("grammar", ARITHMETIC))
    texts = [walk(compiled, seed) for seed in range(6)]
    assert all(_is_arithmetic(t) for t in texts), texts
    assert not _is_arithmetic("(1+2") and _is_arithmetic("(1+2)*30")


def test_gbnf_grammar_is_converted():
    compiled = backend().compile(GrammarSpec("grammar", 'root ::= "x" [0-9]+ "y"'))
    for seed in range(3):
        assert re.fullmatch(r"x[0-9]+y", walk(compiled, seed))
