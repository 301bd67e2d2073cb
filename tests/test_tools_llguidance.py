"""Tool calls constrained by the llguidance backend (test_tools_server.py runs xgrammar):
the "required" schema and the "auto" structural tag, with a special-token trigger
(Mistral's ``[TOOL_CALLS]``) and compact JSON, which llguidance honours in structural
tags too."""

from __future__ import annotations

import openai
import pytest
from server_harness import start_server
from tools_support import (
    COMPACT,
    FAMILIES,
    MESSAGES,
    TOOLS,
    auto_call_kwargs,
    byte_tokenizer,
    chat,
    check_call,
    tiny_tool_model,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tiny_tool_model("mistral", tmp_path_factory.mktemp("tools-mistral-llg"))
    logs = tmp_path_factory.mktemp("tools-llg-logs")
    server = start_server(path, logs, "--structured-outputs-backend", "llguidance")
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c
    server.stop()


def test_required(client):
    choice = chat(client, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls"
    check_call(choice.message.tool_calls[0])


def test_auto_with_compact_arguments(client):
    kwargs = auto_call_kwargs("mistral")
    trigger = byte_tokenizer(FAMILIES["mistral"]).convert_tokens_to_ids("[TOOL_CALLS]")
    kwargs["logit_bias"] = {str(trigger): 100}  # no whitespace bias: the grammar forbids it
    kwargs["extra_body"] = {**kwargs["extra_body"], **COMPACT}
    choice = client.chat.completions.create(
        model="", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=120, **kwargs
    ).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    check_call(call)
    assert " " not in call.function.arguments
