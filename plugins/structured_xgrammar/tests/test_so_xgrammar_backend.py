"""The xgrammar backend: the conformance check, outputs sampled by random walks over the
allowed tokens that always parse and validate, and invalid specs refused by name."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from tessellm.interfaces.structured_output import (
    BITS_PER_WORD,
    GrammarSpec,
    StructuredOutputCapabilities,
    bitmask_words,
)
from tessellm.sources.random_weights import build_tokenizer
from tessellm.testing import check_structured_output_backend
from tessellm_structured_xgrammar.backend import XgrammarBackend

TOKENIZER_SIZE, VOCAB, EOS = 300, 333, 2
STEP_CAP = 4000
SEEDS = range(4)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TOKENIZER_SIZE, 1, [EOS])


@pytest.fixture(scope="module")
def backend(tokenizer):
    return XgrammarBackend(tokenizer, VOCAB, [EOS])


def allowed_ids(mask_row: torch.Tensor) -> list[int]:
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32)
    bits = ((mask_row.unsqueeze(1) >> shifts) & 1).flatten()[:VOCAB]
    return bits.nonzero().flatten().tolist()


def sample(backend, tokenizer, spec: GrammarSpec, seed: int, prefix: str = "") -> str:
    """A random walk over the allowed tokens until the matcher ends. Half the time a
    punctuation token is preferred (closing strings, numbers and containers), so walks end
    within the cap; where the end token is allowed it is taken half the time."""
    rng = random.Random(seed)
    closers = {tokenizer.convert_tokens_to_ids(c) for c in '"]},:)'}
    matcher = backend.compile(spec).new_matcher()
    ids = list(tokenizer.encode(prefix, add_special_tokens=False))
    for token in ids:
        assert matcher.accept_token(token)
    mask = torch.zeros(1, bitmask_words(VOCAB), dtype=torch.int32)
    for _ in range(STEP_CAP):
        matcher.fill_bitmask(mask, 0)
        allowed = allowed_ids(mask[0])
        assert allowed and max(allowed) < TOKENIZER_SIZE
        others = [t for t in allowed if t != EOS]
        if EOS in allowed and (not others or rng.random() < 0.5):
            assert matcher.accept_token(EOS) and matcher.is_terminated()
            return tokenizer.decode(ids)
        preferred = [t for t in others if t in closers]
        token = rng.choice(preferred if preferred and rng.random() < 0.5 else others)
        assert matcher.accept_token(token)
        ids.append(token)
    raise AssertionError(f"no end after {STEP_CAP} tokens: {tokenizer.decode(ids)!r}")


# -- conformance ------------------------------------------------------------------------


def test_conformance_check_passes_for_the_registered_backend():
    result = check_structured_output_backend("xgrammar")
    result.raise_for_failures()
    assert result.passed and "structural_tag" in result.checked


def test_conformance_without_padding_and_with_lark_grammars(tokenizer):
    class LarkXgrammar(XgrammarBackend):
        capabilities = StructuredOutputCapabilities(grammar_syntax="lark")

    check_structured_output_backend(XgrammarBackend, tokenizer).raise_for_failures()
    result = check_structured_output_backend(LarkXgrammar)
    result.raise_for_failures()
    assert "grammar (lark)" in result.checked


def test_conformance_check_catches_broken_backends():
    class AllowsEverything(XgrammarBackend):
        def compile(self, spec):
            compiled = super().compile(spec)
            original = compiled.new_matcher

            def new_matcher():
                matcher = original()
                matcher.fill_bitmask = lambda mask, row: mask[row].fill_(-1)
                return matcher

            compiled.new_matcher = new_matcher
            return compiled

    class RaisesRuntimeError(XgrammarBackend):
        def compile(self, spec):
            if "nope" in spec.value or spec.value == "(":
                raise RuntimeError("bad")
            return super().compile(spec)

    failures = check_structured_output_backend(AllowsEverything).failures
    assert any("ids past the tokenizer" in f for f in failures)
    failures = check_structured_output_backend(RaisesRuntimeError).failures
    assert any("not ValueError" in f for f in failures)


# -- sampled outputs validate -----------------------------------------------------------

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
                "required": ["id", "email"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
            "level": {"enum": [1, 2, 3, None]},
        },
        "required": ["color", "size", "level"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
            "names": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1},
        },
        "required": ["items", "names"],
    },
    "bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "neg": {"type": "integer", "exclusiveMaximum": 0},
        },
        "required": ["age", "score", "neg"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "integer"},
            "c": {"type": "array", "items": {"type": "boolean"}},
        },
        "required": ["b"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "k": {"type": "string", "pattern": "^[a-z]+$"},
                "v": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
            "required": ["k", "v"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_validates(backend, tokenizer, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        text = sample(backend, tokenizer, GrammarSpec("json", json.dumps(schema)), seed)
        jsonschema.validate(json.loads(text), schema)


def test_compact_json_has_no_whitespace_outside_strings(backend, tokenizer):
    schema = SCHEMAS["nested"]
    spec = GrammarSpec("json", json.dumps(schema), any_whitespace=False)
    for seed in SEEDS:
        text = sample(backend, tokenizer, spec, seed)
        jsonschema.validate(json.loads(text), schema)
        assert not re.search(r"\s", _STRING.sub("", text)), text


def test_length_bounded_strings_stay_valid_json(backend, tokenizer):
    """xgrammar 0.2.9 lets raw control characters into strings with minLength/maxLength
    (mlc-ai/xgrammar#800); the backend's rewrite keeps them out (escapes stay out too, as
    in xgrammar: see json_strings.py)."""
    bounded = {"type": "string", "minLength": 2, "maxLength": 4}
    schema = {"type": "object", "properties": {"s": bounded}, "required": ["s"]}
    spec = GrammarSpec("json", json.dumps(schema))

    def accepts(text: str) -> bool:
        matcher = backend.compile(spec).new_matcher()
        tokens = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.accept_token(t) for t in tokens) and matcher.accept_token(EOS)

    assert accepts('{"s": "ab"}') and accepts('{"s": "é 😀x"}')
    assert not accepts('{"s": "a\tb"}') and not accepts('{"s": "a\x0fb"}')
    assert not accepts('{"s": "a"}') and not accepts('{"s": "abcde"}')
    for seed in range(12):
        jsonschema.validate(json.loads(sample(backend, tokenizer, spec, seed)), schema)
    tag = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f"]}
    tag_spec = GrammarSpec("structural_tag", json.dumps(tag))
    for seed in SEEDS:
        text = sample(backend, tokenizer, tag_spec, seed, prefix="<f>")
        jsonschema.validate(json.loads(re.search(r"<f>(.*?)</f>", text, re.DOTALL)[1]), schema)


def test_sampled_json_object_is_an_object(backend, tokenizer):
    for seed in SEEDS:
        assert isinstance(
            json.loads(sample(backend, tokenizer, GrammarSpec("json_object", ""), seed)), dict
        )


@pytest.mark.parametrize(
    "pattern",
    [
        r"[a-z]{2,5}-[0-9]{3}(\.[0-9]+)?",
        r"(\+1 )?\(\d{3}\) \d{3}-\d{4}",
        r"(cat|dog)s?( and (cat|dog)s?)*",
    ],
)
def test_sampled_regex_matches(backend, tokenizer, pattern):
    for seed in SEEDS:
        text = sample(backend, tokenizer, GrammarSpec("regex", pattern), seed)
        assert re.fullmatch(pattern, text), text


def test_sampled_choice_is_one_of_them(backend, tokenizer):
    choices = ["a", "ab", "abc", 'quote " and \\', "new\nline", "é 😀", ""]
    spec = GrammarSpec("choice", json.dumps(choices))
    seen = {sample(backend, tokenizer, spec, seed) for seed in range(12)}
    assert seen <= set(choices) and len(seen) > 1


def test_sampled_grammar_and_structural_tag(backend, tokenizer):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]+'
    for seed in SEEDS:
        text = sample(backend, tokenizer, GrammarSpec("grammar", grammar), seed)
        assert re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", text), text
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tag = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f"]}
    spec = GrammarSpec("structural_tag", json.dumps(tag))
    for seed in SEEDS:
        text = sample(backend, tokenizer, spec, seed, prefix="Calling <f>")
        body = re.search(r"<f>(.*?)</f>", text, re.DOTALL)
        assert body, text
        jsonschema.validate(json.loads(body.group(1)), schema)


# -- matcher edges and invalid specs ----------------------------------------------------


def test_matcher_after_termination_and_out_of_range_tokens(backend, tokenizer):
    matcher = backend.compile(GrammarSpec("choice", '["ok"]')).new_matcher()
    assert not matcher.accept_token(TOKENIZER_SIZE + 1)  # padding of the logits
    assert not matcher.accept_token(VOCAB + 5)
    for token in tokenizer.encode("ok", add_special_tokens=False):
        assert matcher.accept_token(token)
    assert matcher.accept_token(EOS) and matcher.is_terminated()
    assert not matcher.accept_token(tokenizer.encode("o")[0])
    mask = torch.zeros(2, bitmask_words(VOCAB), dtype=torch.int32)
    matcher.fill_bitmask(mask, 1)  # xgrammar itself raises here
    assert allowed_ids(mask[1]) == [EOS] and not mask[0].any()
    matcher.rollback(1)  # the end token is undone
    assert not matcher.is_terminated() and matcher.accept_token(EOS)


INVALID = [
    ("json", '{"type": "nope"}', 'Unsupported type "nope"'),
    ("json", '{"type": "object", "properties": 5}', "properties must be an object"),
    ("json", '{"type": "string", "pattern": "("}', "parenthesis is not closed"),
    ("regex", "(", "parenthesis is not closed"),
    ("regex", "[a-", "Unclosed '['"),
    ("grammar", "root ::= foo", 'Rule "foo" is not defined'),
    ("grammar", 'start ::= "a"', 'root rule with name "root" is not found'),
    ("choice", "[]", "non-empty list"),
    ("choice", '["a", 1]', "strings only"),
    ("structural_tag", "[1]", "must be a JSON object"),
    ("structural_tag", '{"structures": [], "triggers": []}', "triggers must be a non-empty"),
    (
        "structural_tag",
        '{"structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}], "triggers": ["<b"]}',
        "does not match any trigger",
    ),
    (
        "structural_tag",
        '{"structures": [{"begin": "<a>", "schema": {"type": "nope"}, "end": "</a>"}], '
        '"triggers": ["<a"]}',
        'Unsupported type "nope"',
    ),
]


@pytest.mark.parametrize(("kind", "value", "problem"), INVALID)
def test_invalid_specs_raise_value_error_naming_the_problem(backend, kind, value, problem):
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        backend.compile(GrammarSpec(kind, value))
    message = str(info.value)
    assert message.startswith("invalid ") and ".cc:" not in message, message
