"""The llguidance backend's structural tags (text and special-token triggers), its refusal
of invalid specs, and its matcher's end-of-sequence and rollback bookkeeping."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from so_llguidance_walk import EOS, VOCAB, allowed_ids, backend, byte_tokenizer, walk

from tessellm.interfaces.structured_output import GrammarSpec, bitmask_words
from tessellm.sources.random_weights import build_tokenizer
from tessellm_structured_llguidance.backend import LLGuidanceBackend

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
MOVE = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["x"],
    "additionalProperties": False,
}


def tag(*structures: tuple[str, dict, str], triggers: list[str]) -> GrammarSpec:
    value = {
        "type": "structural_tag",
        "structures": [{"begin": b, "schema": s, "end": e} for b, s, e in structures],
        "triggers": triggers,
    }
    return GrammarSpec("structural_tag", json.dumps(value))


def calls(text: str, begin: str, end: str) -> list[object]:
    return [
        json.loads(m) for m in re.findall(re.escape(begin) + "(.*?)" + re.escape(end), text, re.S)
    ]


def test_structural_tag_constrains_after_the_trigger():
    spec = tag(("<tool_call>", WEATHER, "</tool_call>"), triggers=["<tool_call>"])
    compiled = backend().compile(spec)
    for seed in range(4):
        text = walk(compiled, seed, prefix="Sure. <tool_call>")
        assert text.endswith("</tool_call>")  # EOS comes once the call is closed
        (call,) = calls(text, "<tool_call>", "</tool_call>")
        jsonschema.validate(call, WEATHER)
    # Free text, a partial trigger included, may end at any point.
    for text in ("", "no call at all", "almost <tool_ca"):
        matcher = compiled.new_matcher()
        assert all(matcher.accept_token(t) for t in byte_tokenizer().encode(text))
        assert matcher.accept_token(EOS) and matcher.is_terminated()
    # Inside the call: only the schema.
    matcher = compiled.new_matcher()
    assert all(matcher.accept_token(t) for t in byte_tokenizer().encode("ok <tool_call>"))
    assert not matcher.accept_token(byte_tokenizer().encode("?")[0])
    assert not matcher.accept_token(EOS)


def test_structural_tag_structures_sharing_a_trigger():
    spec = tag(
        ("<function=weather>", WEATHER, "</function>"),
        ("<function=move>", MOVE, "</function>"),
        triggers=["<function="],
    )
    compiled = backend().compile(spec)
    names = set()
    for seed in range(8):
        text = walk(compiled, seed, prefix="go <function=")
        name = re.search(r"<function=(\w+)>", text).group(1)
        names.add(name)
        (call,) = calls(text, f"<function={name}>", "</function>")
        jsonschema.validate(call, WEATHER if name == "weather" else MOVE)
    assert names == {"weather", "move"}


def test_structural_tag_special_token_trigger():
    # <tool_call> and </tool_call> as added tokens (Qwen's); llguidance sees them as
    # special tokens, not text, so the grammar matches them as tokens or spelled out.
    tokenizer = build_tokenizer(300, 1, [EOS])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    backend = LLGuidanceBackend(tokenizer, VOCAB, [EOS])
    compiled = backend.compile(
        tag(("<tool_call>", WEATHER, "</tool_call>"), triggers=["<tool_call>"])
    )
    matcher = compiled.new_matcher()
    mask = torch.zeros(1, bitmask_words(VOCAB), dtype=torch.int32)
    matcher.fill_bitmask(mask, 0)
    assert open_id in allowed_ids(mask[0]) and close_id not in allowed_ids(mask[0])
    for seed in range(3):
        text = walk(compiled, seed, prefix="hi <tool_call>", tokenizer=tokenizer)
        (call,) = calls(text, "<tool_call>", "</tool_call>")
        jsonschema.validate(call, WEATHER)
    # The special token closes the call too, and the trigger may also be spelled out.
    body = tokenizer.encode('{"city": "Oslo", "days": 2}')
    spelled = tokenizer.encode("x <tool_call") + tokenizer.encode(">")
    for opening, closing in (([open_id], [close_id]), (spelled, tokenizer.encode("</tool_call"))):
        matcher = compiled.new_matcher()
        tokens = opening + body + closing + (tokenizer.encode(">") if len(closing) > 1 else [])
        assert all(matcher.accept_token(t) for t in tokens)
        assert matcher.accept_token(EOS)


INVALID = [
    (GrammarSpec("json", '{"type": "foo"}'), "invalid JSON schema: Invalid type: foo"),
    (GrammarSpec("json", "{not json"), "JSON schema is not valid JSON"),
    (GrammarSpec("json", "[1, 2]"), "JSON schema must be an object"),
    (GrammarSpec("json", "false"), "the JSON schema false accepts no value"),
    (GrammarSpec("json", '{"type": "array", "uniqueItems": true}'), "Unimplemented keys"),
    (GrammarSpec("json", '{"type": "string", "format": "weird"}'), "Unknown format: weird"),
    (GrammarSpec("regex", "a("), "unclosed group"),
    (GrammarSpec("regex", "(?=a)a"), "look-around"),
    (GrammarSpec("choice", "[]"), "non-empty list of strings"),
    (GrammarSpec("choice", '["a", 1]'), "non-empty list of strings"),
    (GrammarSpec("grammar", "start: missing_rule"), 'unknown name: "missing_rule"'),
    (GrammarSpec("grammar", 'start: "a" /[/'), "invalid Lark grammar"),
    (tag(("<a>", {"type": "foo"}, "</a>"), triggers=["<a"]), "Invalid type: foo"),
    (tag(("<a>", MOVE, "</a>"), triggers=["<b"]), "starts with none of the triggers"),
    (GrammarSpec("structural_tag", '{"structures": [], "triggers": ["<a"]}'), "'structures'"),
]


@pytest.mark.parametrize(("spec", "message"), INVALID, ids=[s.kind for s, _ in INVALID])
def test_invalid_specs_raise_value_error_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        backend().compile(spec)


def test_end_token_and_rollback_bookkeeping():
    a, b = byte_tokenizer().encode("ab")
    matcher = backend().compile(GrammarSpec("regex", "ab")).new_matcher()
    mask = torch.zeros(1, bitmask_words(VOCAB), dtype=torch.int32)

    def allowed() -> list[int]:
        matcher.fill_bitmask(mask, 0)
        return allowed_ids(mask[0])

    assert not matcher.accept_token(EOS)  # the grammar is not complete
    assert not matcher.accept_token(310) and not matcher.accept_token(VOCAB + 5)
    assert matcher.accept_token(a) and matcher.accept_token(b)
    assert allowed() == [EOS]
    # llguidance records no token for an EOS consumed after it stopped; rolling back the
    # EOS must still undo exactly one token.
    assert matcher.accept_token(EOS) and matcher.is_terminated()
    assert allowed() == [EOS] and not matcher.accept_token(a)
    matcher.rollback(1)
    assert not matcher.is_terminated() and allowed() == [EOS]
    matcher.rollback(1)
    assert allowed() == [b]
    with pytest.raises(ValueError, match="only 1 were accepted"):
        matcher.rollback(2)
    assert allowed() == [b] and matcher.accept_token(b)  # still usable


def test_refused_token_leaves_the_matcher_working():
    matcher = backend().compile(GrammarSpec("regex", "[0-9]+")).new_matcher()
    digit, letter = byte_tokenizer().encode("7x")
    assert not matcher.accept_token(letter)  # llguidance alone would now be in error
    assert matcher.accept_token(digit) and matcher.accept_token(EOS)


def test_vocab_narrower_than_the_tokenizer_is_refused():
    with pytest.raises(ValueError, match="more than the model's 299 logits"):
        LLGuidanceBackend(byte_tokenizer(), 299, [EOS])


def test_bitmask_layouts():
    matcher = backend().compile(GrammarSpec("regex", "[0-9]+")).new_matcher()
    words = bitmask_words(VOCAB)
    digits = byte_tokenizer().encode("0123456789")
    # Rows of a wider buffer (row stride past the row's words) are filled in place.
    wide = torch.full((3, words + 5), 7, dtype=torch.int32)
    matcher.fill_bitmask(wide[:, :words], 2)
    assert allowed_ids(wide[2, :words]) == sorted(digits)
    assert bool((wide[:2] == 7).all()) and bool((wide[2, words:] == 7).all())
    for bad in (
        torch.zeros(2, words, dtype=torch.int64),
        torch.zeros(2, words + 1, dtype=torch.int32),
        torch.zeros(words, 2, dtype=torch.int32).t(),
    ):
        with pytest.raises(ValueError, match="bitmask"):
            matcher.fill_bitmask(bad, 0)
    with pytest.raises(ValueError, match="out of range"):
        matcher.fill_bitmask(torch.zeros(2, words, dtype=torch.int32), 2)
