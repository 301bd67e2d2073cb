"""Tool calling through the official ``openai`` client against a real ``tessellm serve``,
for each family's chat template with tools: a Qwen-style Hermes template on a tiny Qwen2
and a Llama 3.1 template on a tiny Llama (tools_support.py).

The models are random, so their answers are gibberish: the tests check what a grammar
guarantees whatever the model prefers (calls that parse and validate against the tool's
schema) and what the server must do with any answer (the shapes of answers and streams).
"""

from __future__ import annotations

import json
import subprocess

import jsonschema
import openai
import pytest
from server_harness import cli_command, start_server
from tools_support import (
    ALARM,
    COMPACT,
    FAMILIES,
    MAX_TOKENS,
    MESSAGES,
    SCHEMAS,
    TOOLS,
    WEATHER,
    accumulate,
    auto_call_kwargs,
    byte_tokenizer,
    chat,
    check_call,
    tiny_tool_model,
)

from tessellm_mistral.tool_parser import mistral_call_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["hermes", "llama3_json", "mistral"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    path = tiny_tool_model(family, tmp_path_factory.mktemp(f"tools-{family}"))
    server = start_server(path, tmp_path_factory.mktemp("tools-logs"), "--max-num-seqs", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def test_the_parser_is_detected(server, family):
    assert f"read by the {family!r} parser" in server.log()


def test_required_call_validates(client):
    choice = chat(client, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    check_call(call)


def test_required_parallel_calls_validate(client):
    choice = chat(client, tool_choice="required", max_tokens=300).choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason in ("tool_calls", "length")
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    for call in complete:
        check_call(call)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("tool", [WEATHER, ALARM])
def test_named_function(client, tool):
    name = tool["function"]["name"]
    choice = chat(client, tool_choice={"type": "function", "function": {"name": name}}).choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == name
    check_call(call)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}]
)
def test_streamed_call_reassembles_to_the_whole_one(client, tool_choice):
    kwargs = dict(tool_choice=tool_choice, parallel_tool_calls=False)
    whole = chat(client, **kwargs).choices[0]
    stream = chat(client, stream=True, **kwargs)
    content, calls, finish = accumulate(stream)
    assert content is None and finish == "tool_calls"
    [expected] = whole.message.tool_calls
    [call] = calls
    assert (call["name"], call["args"]) == (expected.function.name, expected.function.arguments)
    # The SDK's own stream helper puts the deltas together the same way.
    with client.chat.completions.stream(
        model="",
        messages=MESSAGES,
        tools=TOOLS,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body=COMPACT,
        **kwargs,
    ) as helper:
        final = helper.get_final_completion()
    [sdk_call] = final.choices[0].message.tool_calls
    assert sdk_call.function.arguments == expected.function.arguments
    assert sdk_call.function.name == expected.function.name
    jsonschema.validate(sdk_call.function.parsed_arguments, SCHEMAS[sdk_call.function.name])


def test_tool_choice_none_is_unconstrained(client, server, family):
    """The tools reach the template and the answer is the model's free text: the same as
    a completion of the rendered prompt."""
    choice = chat(client, tool_choice="none", max_tokens=16).choices[0]
    assert choice.message.tool_calls is None
    tokenizer = byte_tokenizer(FAMILIES[family])
    prompt = tokenizer.apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    plain = client.completions.create(model="", prompt=ids, temperature=0, max_tokens=16)
    assert choice.message.content == plain.choices[0].text
    assert choice.finish_reason == plain.choices[0].finish_reason


def test_conversation_with_calls_and_results(client, family):
    args = {"city": "Rome", "days": 2}
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21 C"},
    ]
    response = chat(client, messages=messages, tool_choice="required", parallel_tool_calls=False)
    check_call(response.choices[0].message.tool_calls[0])
    # The template got the call's arguments as a dict (not JSON text quoted again).
    tokenizer = byte_tokenizer(FAMILIES[family])
    # Mistral's template takes 9-character ids: the server shortens them.
    call_id = mistral_call_id("call_abc123") if family == "mistral" else "call_abc123"
    expected = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]
    text = tokenizer.apply_chat_template(
        expected, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert (
        '"parameters": {"city": "Rome", "days": 2}' in text
        or '"arguments": {"city": "Rome", "days": 2}' in text
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert response.usage.prompt_tokens == len(ids)


def test_auto_call_is_constrained_and_streams_the_same(client, family):
    kwargs = dict(
        model="",
        messages=MESSAGES,
        tools=TOOLS,
        temperature=0,
        max_tokens=MAX_TOKENS,
        **auto_call_kwargs(family),
    )
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    check_call(call)
    content, calls, finish = accumulate(client.chat.completions.create(stream=True, **kwargs))
    assert (content, finish) == (None, "tool_calls")
    assert [(c["name"], c["args"]) for c in calls] == [
        (call.function.name, call.function.arguments)
    ]


def test_auto_without_a_call_is_content(client):
    choice = chat(client, max_tokens=8, logit_bias={"65": 100}).choices[0]  # "b" each time
    assert choice.message.tool_calls is None
    assert choice.message.content == "b" * 8 and choice.finish_reason == "length"


BAD = [
    (dict(tools=None, tool_choice="required"), "tool_choice", "only allowed when tools"),
    (
        dict(tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice",
        "'nope', which is not among the tools",
    ),
    (dict(tools=[WEATHER, WEATHER]), "tools", "given twice"),
    (
        dict(
            tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ]
        ),
        "tools",
        "type 'object'",
    ),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools", "pattern"),
    (dict(tools=[{"type": "retrieval"}]), "tools", ""),
    (dict(tool_choice="sometimes"), "tool_choice", ""),
    (
        dict(
            tool_choice="required",
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": 5}}},
                    },
                }
            ],
        ),
        "tools",
        "tools (tool_choice 'required'): invalid JSON schema",
    ),
    (
        dict(tool_choice="required", response_format={"type": "json_object"}),
        "tools",
        "one output constraint",
    ),
]


@pytest.mark.parametrize(("kwargs", "param", "words"), BAD)
def test_bad_tool_requests_are_400(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **kwargs)
    error = info.value.body
    assert error["param"] == param, error
    assert words in error["message"]


def test_auto_needs_a_parser(tiny_server):
    """A template with no tool-call format: "auto" is a 400 saying what to do; "none"
    renders the tools and answers."""
    with openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as plain:
        with pytest.raises(openai.BadRequestError) as info:
            plain.chat.completions.create(model="", messages=MESSAGES, tools=TOOLS, max_tokens=2)
        assert info.value.body["param"] == "tool_choice"
        assert "--tool-call-parser" in info.value.body["message"]
        answer = plain.chat.completions.create(
            model="", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=2
        )
        assert answer.choices[0].message.tool_calls is None


def test_serve_refuses_an_unknown_parser(tiny_llama, tmp_path):
    done = subprocess.run(
        cli_command("serve", "--model", str(tiny_llama), "--tool-call-parser", "nope"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "nope" in done.stderr and "hermes" in done.stderr and "llama3_json" in done.stderr
    assert "loading" not in done.stderr  # refused before the model loads


def test_each_choice_has_its_calls(client):
    response = chat(
        client, tool_choice="required", parallel_tool_calls=False, n=2, seed=7, temperature=1.0
    )
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        check_call(choice.message.tool_calls[0])
