"""Tool calling offline: ``LLM.chat(..., tools=...)`` renders the tools as the server does,
and the server's "required" schema constrains an offline answer to calls that validate."""

from __future__ import annotations

import pytest
from tools_support import FAMILIES, MESSAGES, SCHEMAS, TOOLS, byte_tokenizer, tiny_tool_model

from tessellm import LLM, SamplingParams, StructuredOutputsParams
from tessellm.server.tool_calls import REQUIRED_FORMAT
from tessellm.server.tool_setup import required_schema
from tessellm.tool_parsers.json_calls import JsonCallStream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tiny_tool_model("hermes", tmp_path_factory.mktemp("tools-offline"))
    return LLM(model=str(path), dtype="float32", device="cpu", max_num_seqs=4)


def test_chat_renders_tools(llm):
    [out] = llm.chat(MESSAGES, SamplingParams(max_tokens=1), tools=TOOLS)
    tokenizer = byte_tokenizer(FAMILIES["hermes"])
    text = tokenizer.apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert out.prompt_token_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_required_schema_offline(llm):
    import json

    import jsonschema

    schema = required_schema(TOOLS, parallel=False)
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs=constraint)
    [out] = llm.chat(MESSAGES, params, tools=TOOLS)
    answer = out.outputs[0].text
    jsonschema.validate(json.loads(answer), schema)
    stream = JsonCallStream(REQUIRED_FORMAT, list(SCHEMAS), lambda: "call_0")
    delta = stream.feed(answer)
    delta.extend(stream.finish())
    [header, *fragments] = delta.tool_calls
    arguments = "".join(f.arguments for f in fragments)
    jsonschema.validate(json.loads(arguments), SCHEMAS[header.name])
    assert delta.content == ""
