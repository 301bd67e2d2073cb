"""Tool-call parsers on handwritten answers: text only, one call, two calls, text then a
call, malformed calls (given back as content), each read whole and streamed in small
random pieces (the same content and calls either way)."""

from __future__ import annotations

import json
import random

import pytest

from tessellm.interfaces.tool_parser import ParsedOutput, ToolCall, ToolCallParser
from tessellm.plugins import get_plugins
from tessellm.server.tool_calls import REQUIRED_FORMAT, NamedCallStream
from tessellm.server.tool_setup import detect_parser
from tessellm.tool_parsers.hermes import HermesToolParser
from tessellm.tool_parsers.json_calls import JsonCallStream
from tessellm_llama.tool_parser import Llama3JsonToolParser
from tessellm_mistral.tool_parser import MistralToolParser, mistral_call_id

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "add"}},
]
W = '{"city": "Pa\\"}ris", "days": [1, {"d": 2}]}'  # braces and quotes inside strings
A = '{"a": 1, "b": -2.5e3, "c": null, "d": true}'

# (answer, content, [(name, arguments)]) per parser; None content: calls only.
HERMES = [
    ("Hello there.\n", "Hello there.\n", []),
    (
        f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>',
        None,
        [("get_weather", W)],
    ),
    (
        f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name": "add", "arguments": {A}}}\n</tool_call>',
        None,
        [("get_weather", W), ("add", A)],
    ),
    (
        f'Let me look.\n\n<tool_call>\n{{"name": "add", "arguments": {A}}}\n</tool_call>',
        "Let me look.",
        [("add", A)],
    ),
    # keys in any order; arguments written as a JSON string; no end marker at the end
    (f'<tool_call>{{"arguments": {A}, "name": "add"}}</tool_call>', None, [("add", A)]),
    ('<tool_call>\n{"name": "add", "arguments": "{\\"x\\": 1}"}', None, [("add", '{"x": 1}')]),
    ('<tool_call>\n{"name": "add"}\n</tool_call>', None, [("add", "{}")]),
    # malformed: content as written
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        [],
    ),
    ('<tool_call>\n{"name": 5}</tool_call>', '<tool_call>\n{"name": 5}</tool_call>', []),
    (
        '<tool_call>\n{"name": "add", "arguments": [1]}</tool_call>',
        '<tool_call>\n{"name": "add", "arguments": [1]}</tool_call>',
        [],
    ),
    ('<tool_call>\n{"name": "ad', '<tool_call>\n{"name": "ad', []),
    ("a < b <tool_", "a < b <tool_", []),
    # a call cut short after its name was sent keeps what it has (finish_reason says length)
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1', None, [("add", '{"a": 1')]),
]
LLAMA = [
    ("The weather is fine.", "The weather is fine.", []),
    (f'{{"name": "get_weather", "parameters": {W}}}', None, [("get_weather", W)]),
    (f'<|python_tag|>{{"name": "add", "parameters": {A}}}', None, [("add", A)]),
    (
        f'{{"name": "get_weather", "parameters": {W}}}; {{"name": "add", "parameters": {A}}}',
        None,
        [("get_weather", W), ("add", A)],
    ),
    (f'Calling it.\n{{"name": "add", "arguments": {A}}}', "Calling it.", [("add", A)]),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),  # JSON, not a call
    ('{"a": {"name": 1}}', '{"a": {"name": 1}}', []),
    ('{"name": "add", "parameters": 7}', '{"name": "add", "parameters": 7}', []),
]
MISTRAL = [
    ("Sure, here it is.", "Sure, here it is.", []),
    (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {W}}}]', None, [("get_weather", W)]),
    (
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {W}}}, '
        f'{{"name": "add", "arguments": {A}}}]',
        None,
        [("get_weather", W), ("add", A)],
    ),
    (
        f'[TOOL_CALLS] [{{"name": "add", "arguments": {A}}}][TOOL_CALLS] '
        f'[{{"name": "add", "arguments": {{}}}}]',
        None,
        [("add", A), ("add", "{}")],
    ),
    (f'Checking. [TOOL_CALLS][{{"name": "add", "arguments": {A}}}]', "Checking.", [("add", A)]),
    (f'[TOOL_CALLS] {{"name": "add", "arguments": {A}}}', None, [("add", A)]),  # no list
    ("[TOOL_CALLS] nonsense", "[TOOL_CALLS] nonsense", []),
    (f'[TOOL_CALLS] [{{"name": "add", "arguments": {A}}}, oops]', ", oops]", [("add", A)]),
]
CASES = [
    *[(HermesToolParser, *c) for c in HERMES],
    *[(Llama3JsonToolParser, *c) for c in LLAMA],
    *[(MistralToolParser, *c) for c in MISTRAL],
]


def streamed(parser: ToolCallParser, text: str, rng: random.Random) -> ParsedOutput:
    """Feed ``text`` in pieces of 1 to 6 characters; put the deltas together."""
    stream = parser.new_stream()
    content = ""
    calls: list[list[str]] = []
    ids: list[str] = []
    pos = 0
    deltas = []
    while pos < len(text):
        size = rng.randint(1, 6)
        deltas.append(stream.feed(text[pos : pos + size]))
        pos += size
    deltas.append(stream.finish())
    for delta in deltas:
        content += delta.content
        for d in delta.tool_calls:
            if d.id is not None:
                assert d.index == len(calls) and d.arguments == "" and d.name
                calls.append([d.name, ""])
                ids.append(d.id)
            else:
                assert d.name is None and d.arguments
                calls[d.index][1] += d.arguments
    found = [ToolCall(i, n, a) for i, (n, a) in zip(ids, calls, strict=True)]
    return ParsedOutput(content if content or not found else None, found)


@pytest.mark.parametrize(("parser_cls", "text", "content", "calls"), CASES)
def test_parse_whole_and_streamed(parser_cls, text, content, calls):
    parser = parser_cls(TOOLS)
    whole = parser.parse(text)
    assert whole.content == content
    assert [(c.name, c.arguments) for c in whole.tool_calls] == calls
    rng = random.Random(text)
    for _ in range(20):
        part = streamed(parser, text, rng)
        assert part.content == content
        assert [(c.name, c.arguments) for c in part.tool_calls] == calls


def test_text_without_calls_is_returned_exactly():
    rng = random.Random(0)
    alphabet = ' \n{}[]"<>:;,abn_/|TOOLSCAename'
    for parser_cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser):
        parser = parser_cls(TOOLS)
        for _ in range(200):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            whole = parser.parse(text)
            if not whole.tool_calls:
                assert whole.content == text
            again = streamed(parser, text, rng)
            assert again.content == whole.content
            assert [(c.name, c.arguments) for c in again.tool_calls] == [
                (c.name, c.arguments) for c in whole.tool_calls
            ]


def test_call_ids():
    calls = HermesToolParser(TOOLS).parse(HERMES[2][0]).tool_calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    assert calls[0].id != calls[1].id
    for call in MistralToolParser(TOOLS).parse(MISTRAL[2][0]).tool_calls:
        assert len(call.id) == 9 and call.id.isalnum()


def test_mistral_shortens_ids_in_the_conversation():
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0123456789abcdef"}]},
        {"role": "tool", "content": "1", "tool_call_id": "call_0123456789abcdef"},
        {"role": "tool", "content": "2", "tool_call_id": "abc"},
    ]
    out = MistralToolParser.prepare_messages(messages)
    assert out[0]["tool_calls"][0]["id"] == out[1]["tool_call_id"] == "789abcdef"
    assert len(out[2]["tool_call_id"]) == 9 and out[2]["tool_call_id"] == mistral_call_id("abc")
    assert mistral_call_id("AbC123xyz") == "AbC123xyz"


@pytest.mark.parametrize(
    ("parser_cls", "begin", "end"),
    [
        (HermesToolParser, '<tool_call>\n{"name": "add", "arguments": ', "}\n</tool_call>"),
        (Llama3JsonToolParser, '{"name": "add", "parameters": ', "}"),
        (MistralToolParser, '[TOOL_CALLS] [{"name": "add", "arguments": ', "}]"),
    ],
)
def test_structural_tag(parser_cls, begin, end):
    tag = parser_cls(TOOLS).structural_tag()
    assert tag["type"] == "structural_tag"
    assert tag["triggers"][0] == parser_cls.trigger
    add = {"begin": begin, "schema": {"type": "object", "properties": {}}, "end": end}
    assert add in tag["structures"]
    assert len(tag["structures"]) == len(TOOLS) * len(tag["triggers"])
    for s in tag["structures"]:
        assert any(s["begin"].startswith(t) for t in tag["triggers"])
        # The text a constrained call produces is read back as that call.
        arguments = json.dumps({"x": [1, "}"]})
        parsed = parser_cls(TOOLS).parse("ok " + s["begin"] + arguments + s["end"])
        name = s["begin"].split('"name": "')[1].split('"')[0]
        assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(name, arguments)]


def test_required_and_named_answers():
    rng = random.Random(3)
    answer = f'[{{"name": "get_weather", "parameters": {W}}}, {{"name": "add", "parameters": {A}}}]'
    for _ in range(20):
        stream = JsonCallStream(REQUIRED_FORMAT, ["get_weather", "add"], lambda: "call_x")
        content, calls = "", []
        pos = 0
        while pos < len(answer):
            size = rng.randint(1, 5)
            delta = stream.feed(answer[pos : pos + size])
            pos += size
            content += delta.content
            for d in delta.tool_calls:
                if d.id:
                    calls.append([d.name, ""])
                calls[d.index][1] += d.arguments
        assert content + stream.finish().content == ""
        assert calls == [["get_weather", W], ["add", A]]
    stream = NamedCallStream("add", "call_y")
    first, second = stream.feed('{"a"'), stream.feed(": 1}")
    assert first.tool_calls[0].id == "call_y" and first.tool_calls[0].name == "add"
    assert first.tool_calls[1].arguments + second.tool_calls[0].arguments == '{"a": 1}'
    assert stream.finish().tool_calls == []


def test_registered_and_detected():
    plugins = get_plugins()
    assert {"hermes", "llama3_json", "mistral"} <= set(plugins.names("tool_call_parsers"))
    assert plugins.get("tool_call_parsers", "hermes").plugin == "tessellm.builtin"
    qwen = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"
    assert detect_parser(qwen, ["LlamaForCausalLM"])[0] == "hermes"  # a Hermes fine-tune
    llama = "{% if tools %}dictionary of argument name and its value{% endif %}"
    assert detect_parser(llama, ["LlamaForCausalLM"])[0] == "llama3_json"
    assert detect_parser("[TOOL_CALLS] {{ tools }}", ["MistralForCausalLM"])[0] == "mistral"
    # a template that mentions tools in no known format: the architecture decides
    assert detect_parser("{{ tools }}", ["MixtralForCausalLM"])[0] == "mistral"
    assert detect_parser("{{ messages }}", ["LlamaForCausalLM"]) is None


def test_reader_drops_the_eos_text_and_extra_calls():
    """With special tokens kept (Mistral) the end-of-sequence token's text is not content;
    without parallel_tool_calls an "auto" answer keeps its first call."""
    from tessellm.server.tool_calls import _Reader

    parser = MistralToolParser(TOOLS)
    reader = _Reader(parser.new_stream(), ("</s>",), max_calls=1)
    delta = reader.feed("Hi</s>", "stop")
    assert delta.content == "Hi" and reader.finish_reason("stop") == "stop"
    reader = _Reader(parser.new_stream(), ("</s>",), max_calls=1)
    delta = reader.feed(MISTRAL[2][0] + "</s>", "stop")
    assert [(d.index, d.name) for d in delta.tool_calls if d.id] == [(0, "get_weather")]
    assert {d.index for d in delta.tool_calls} == {0} and delta.content == ""
    assert reader.finish_reason("stop") == "tool_calls"
    assert reader.finish_reason("length") == "length"


def test_required_schema_hoists_definitions():
    import jsonschema

    from tessellm.server.errors import APIError
    from tessellm.server.tool_setup import required_schema

    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tools = [
        {
            "type": "function",
            "function": {
                "name": "move",
                "parameters": {
                    "type": "object",
                    "properties": {"to": {"$ref": "#/$defs/Point"}},
                    "required": ["to"],
                    "$defs": {"Point": point},
                },
            },
        },
        {"type": "function", "function": {"name": "stop"}},
    ]
    schema = required_schema(tools, parallel=True)
    assert schema["$defs"] == {"Point": point} and "maxItems" not in schema
    good = [{"name": "move", "parameters": {"to": {"x": 1}}}, {"name": "stop", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "move", "parameters": {"to": {"x": "1"}}}], [{"name": "rm"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required_schema(tools, parallel=False)["maxItems"] == 1
    assert "$defs" in tools[0]["function"]["parameters"]  # the request's own tools unchanged
    clash = {**tools[1], "function": {"name": "stop", "parameters": {"$defs": {"Point": {}}}}}
    with pytest.raises(APIError, match="define \\$defs/Point differently"):
        required_schema([tools[0], clash], parallel=True)
