"""Hermes tool calls (Qwen 2/2.5/3, QwQ, Hermes 2 Pro/3): each call is
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

from __future__ import annotations

from tessellm.tool_parsers.json_calls import JsonCallFormat, JsonToolCallParser


class HermesToolParser(JsonToolCallParser):
    name = "hermes"
    architectures = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    template_markers = ("<tool_call>",)
    trigger = "<tool_call>"
    format = JsonCallFormat(starts=("<tool_call>",), end="</tool_call>")
    call_prefixes = ('<tool_call>\n{"name": ',)
    call_suffix = "}\n</tool_call>"
