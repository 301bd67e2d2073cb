"""Llama 3.1/3.2/3.3 tool calls: the JSON object ``{"name": ..., "parameters": {...}}``
as the answer, sometimes after ``<|python_tag|>``, several separated by ``;``."""

from __future__ import annotations

from tessellm.tool_parsers.json_calls import JsonCallFormat, JsonToolCallParser


class Llama3JsonToolParser(JsonToolCallParser):
    name = "llama3_json"
    architectures = ("LlamaForCausalLM",)
    # Meta's templates describe the call format in these words.
    template_markers = ("dictionary of argument name and its value", "<|python_tag|>")
    trigger = '{"name"'
    format = JsonCallFormat(starts=("<|python_tag|>",), payload_starts=('{"name"',), separators=";")
    # Llama 3.1 sometimes starts a call with <|python_tag|> (a special token): that call
    # is constrained too.
    triggers = ('{"name"', "<|python_tag|>")
    call_prefixes = ('{"name": ', '<|python_tag|>{"name": ')
    arguments_prefix = ', "parameters": '
    call_suffix = "}"
