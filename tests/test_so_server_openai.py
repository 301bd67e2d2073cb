"""Structured outputs through the official ``openai`` client against a real ``tessellm serve``.

The model is a tiny random Llama with a byte-level tokenizer (every byte a token, so any
JSON can be spelled; logits padded past the tokenizer). Its greedy output is gibberish,
so every test checks validity, which the grammar guarantees whatever the model prefers.
The random model never prefers to close anything: schemas bound every string and array,
and JSON requests ask for compact output (``disable_any_whitespace``), else a grammar that
admits whitespace between tokens would let the model spend its budget there.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from conftest import tiny_llama_config
from pydantic import BaseModel, Field
from server_harness import start_server

from tessellm.sources.random_weights import build_tokenizer
from tessellm.testing import save_tiny_model

pytestmark = pytest.mark.slow

TOKENIZER_SIZE = 300
VOCAB = 320  # logits past the tokenizer are never allowed
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
MAX_TOKENS = 400  # the longest document of the 50 schemas below is ~130 tokens
NUM_SCHEMAS = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_model(
        tiny_llama_config(vocab_size=VOCAB), tmp_path_factory.mktemp("so-byte-llama")
    )
    build_tokenizer(TOKENIZER_SIZE, 1, [2]).save_pretrained(path)
    logs = tmp_path_factory.mktemp("so-server-logs")
    server = start_server(
        path, logs, "--structured-outputs-backend", "xgrammar", "--max-num-seqs", "64"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def chat(client, model, max_tokens=MAX_TOKENS, **kwargs):
    return client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=max_tokens, **kwargs
    )


# -- a deterministic generator of finite JSON schemas ------------------------------------

WORDS = ["red", "green", "blue", "a b", "x", "ok"]
KEYS = ["id", "name", "tags", "size", "kind", "ok", "items", "meta", "score", "note"]


def _string(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.4:
        return {"type": "string", "enum": rng.sample(WORDS, rng.randint(1, 3))}
    schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 6)}
    if rng.random() < 0.5:
        schema["minLength"] = rng.randint(0, schema["maxLength"])
    return schema


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "null", "enum"]
    if depth < 3:
        kinds += ["array", "object", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return _string(rng)
    if kind in ("integer", "number"):
        low = rng.randint(-50, 50)
        return {"type": kind, "minimum": low, "maximum": low + rng.randint(1, 200)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["red", 1, None, True, "x y"], rng.randint(1, 3))}
    if kind == "array":
        low = rng.randint(0, 1)
        items = _value(rng, depth + 1)
        return {
            "type": "array",
            "items": items,
            "minItems": low,
            "maxItems": low + rng.randint(0, 2),
        }
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = rng.sample(KEYS, rng.randint(1, 3 if depth else 4))
    return {
        "type": "object",
        "properties": {k: _value(rng, depth) for k in keys},
        "required": [k for k in keys if rng.random() < 0.6],
        "additionalProperties": False,
    }


def generated_schemas(count: int = NUM_SCHEMAS, seed: int = 15) -> list[dict[str, Any]]:
    """Objects nested up to 3 deep with enums, bounded arrays, strings, integers and
    numbers, optional and required properties; every string and array bounded."""
    return [_object(random.Random(seed * 1000 + i), 0) for i in range(count)]


def _keywords(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {f"type:{schema['type']}"} if "type" in schema else set()
        found |= set(schema)
        return found.union(*(_keywords(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_keywords(v) for v in schema))
    return set()


def test_generated_schemas_cover_the_features():
    schemas = generated_schemas()
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == NUM_SCHEMAS
    seen = _keywords(schemas)
    wanted = {"enum", "maxItems", "minItems", "maxLength", "minimum", "maximum", "required"}
    wanted |= {f"type:{t}" for t in ("object", "array", "string", "integer", "number")}
    assert wanted <= seen
    assert any(_depth(s) >= 3 for s in schemas)


def _depth(schema: dict[str, Any]) -> int:
    inner = [_depth(v) for v in schema.get("properties", {}).values()]
    if "items" in schema:
        inner.append(_depth(schema["items"]))
    return 1 + max(inner, default=0) if schema.get("type") in ("object", "array") else 0


# -- tests -------------------------------------------------------------------------------


class Pet(BaseModel):
    name: Annotated[str, Field(max_length=8)]
    kind: Literal["cat", "dog"]
    age: Annotated[int, Field(ge=0, le=30)]


class Household(BaseModel):
    city: Annotated[str, Field(max_length=6)]
    pets: Annotated[list[Pet], Field(min_length=1, max_length=2)]
    verified: bool


def test_parse_returns_the_pydantic_model(client, model):
    completion = client.chat.completions.parse(
        model=model,
        messages=MESSAGES,
        response_format=Household,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        extra_body=COMPACT,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Household)
    assert choice.message.parsed == Household.model_validate_json(choice.message.content)


@pytest.mark.parametrize("backend", [None, "llguidance"])
def test_generated_schemas_validate(server, model, backend):
    schemas = generated_schemas()
    if backend == "llguidance":
        # llguidance bounds a number's value but not its digits (xgrammar bounds both),
        # and a random model may never stop adding them.
        schemas = [s for s in schemas if "type:number" not in _keywords(s)]
        assert len(schemas) > NUM_SCHEMAS // 3
    options = {"disable_any_whitespace": True, "backend": backend}

    async def one(client: openai.AsyncOpenAI, i: int, schema: dict[str, Any]):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        return await client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            temperature=0,
            max_tokens=MAX_TOKENS,
            response_format=fmt,
            extra_body={"structured_outputs": options},
        )

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i, s) for i, s in enumerate(schemas)))

    results = asyncio.run(run_all())
    for i, (schema, result) in enumerate(zip(schemas, results, strict=True)):
        choice = result.choices[0]
        where = f"schema {i}: {json.dumps(schema)}\noutput: {choice.message.content!r}"
        assert choice.finish_reason == "stop", where
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_regex_and_choice(client, model):
    pattern = r"[a-z]{2,5}-\d{3}( [A-Z][a-z]{0,4})?"
    got = chat(client, model, extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, got.choices[0].message.content)
    assert got.choices[0].finish_reason == "stop"
    options = ["sunny", "rainy", "a longer answer"]
    got = chat(client, model, extra_body={"structured_outputs": {"choice": options}}, n=3)
    assert all(c.message.content in options for c in got.choices)


def test_legacy_guided_fields(client, model):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    got = chat(client, model, extra_body={"guided_json": schema, **COMPACT})
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)
    as_text = {"guided_json": json.dumps(schema), "guided_decoding_backend": "llguidance"}
    got = chat(client, model, extra_body={**as_text, **COMPACT})
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)
    got = chat(client, model, extra_body={"guided_choice": ["yes", "no"]})
    assert got.choices[0].message.content in ("yes", "no")
    got = chat(client, model, extra_body={"guided_regex": r"\d{4}"})
    assert re.fullmatch(r"\d{4}", got.choices[0].message.content)
    grammar = 'root ::= "(" [a-c]{1,3} ")"'
    got = chat(client, model, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"\([a-c]{1,3}\)", got.choices[0].message.content)


def test_completions_take_response_format(client, model):
    schema = generated_schemas(1, seed=7)[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    got = client.completions.create(
        model=model,
        prompt=["JSON:", "More JSON:"],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"response_format": fmt, **COMPACT},
    )
    assert len(got.choices) == 2
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), schema)


def test_json_object(client, model):
    # Any JSON object may nest and run on; a bias towards closing quotes and braces (only
    # where the grammar allows them) keeps the random model's document short.
    tokenizer = build_tokenizer(TOKENIZER_SIZE, 1, [2])
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 30 for t in ('"', "}")}
    fmt = {"type": "json_object"}
    got = chat(client, model, response_format=fmt, logit_bias=bias, extra_body=COMPACT)
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(got.choices[0].message.content), dict)


def test_streamed_response_format_joins_to_valid_json(client, model):
    schema = generated_schemas(3, seed=3)[2]
    fmt = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    stream = chat(client, model, response_format=fmt, stream=True, extra_body=COMPACT)
    pieces, finish = [], []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish.append(choice.finish_reason)
    assert len([p for p in pieces if p]) > 1  # it did stream
    assert finish[-1] == "stop"
    jsonschema.validate(json.loads("".join(pieces)), schema)
    same = chat(client, model, response_format=fmt, extra_body=COMPACT)
    assert same.choices[0].message.content == "".join(pieces)  # greedy: the same text


BAD_CONSTRAINTS = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "integr"}}},
                },
            }
        },
        "response_format",
        "integr",
    ),
    ({"guided_regex": "([a-z]+"}, "guided_regex", "regex"),
    (
        {"structured_outputs": {"grammar": "root ::= missing_rule"}},
        "structured_outputs",
        "missing_rule",
    ),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    (
        {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
        "guided_choice",
        "response_format (json_object) and guided_choice",
    ),
    ({"structured_outputs": {"regex": "a", "backend": "nope"}}, "structured_outputs", "nope"),
]


@pytest.mark.parametrize(("extra", "param", "named"), BAD_CONSTRAINTS)
def test_invalid_constraint_is_a_400_naming_it(client, model, extra, param, named):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, model, max_tokens=5, extra_body=extra)
    error = caught.value.body
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert named in error["message"]
    # The server still answers, constrained requests included.
    got = chat(client, model, extra_body={"guided_choice": ["fine"]})
    assert got.choices[0].message.content == "fine"


def test_invalid_schema_in_a_stream_is_a_400(client, model):
    bad = {"guided_json": {"type": "object", "properties": {"a": {"type": "integr"}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, model, stream=True, extra_body=bad)
    assert "integr" in caught.value.body["message"]


def test_serve_flag_picks_the_default_backend(client, model):
    def problem(**backend):
        with pytest.raises(openai.BadRequestError) as caught:
            extra = {"structured_outputs": {"regex": "([a-z]+", **backend}}
            chat(client, model, max_tokens=5, extra_body=extra)
        return caught.value.body["message"]

    # The backends word the same error differently: the default is the flag's.
    assert problem() == problem(backend="xgrammar") != problem(backend="llguidance")


def test_unknown_serve_backend_fails_at_start(server, tmp_path):
    model_dir = server.process.args[server.process.args.index("--model") + 1]
    with pytest.raises(RuntimeError, match=r"(?s)exited with [1-9].*'nope'"):
        start_server(Path(model_dir), tmp_path, "--structured-outputs-backend", "nope")
