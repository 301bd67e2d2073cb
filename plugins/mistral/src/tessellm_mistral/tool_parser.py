"""Mistral tool calls (v0.3 instruct and its successors' JSON form):
``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``. ``[TOOL_CALLS]`` is a special
token, so the text keeps special tokens; call ids are 9 letters and digits, as Mistral's
chat templates insist."""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from typing import Any

from tessellm.tool_parsers.json_calls import JsonCallFormat, JsonToolCallParser

_ALPHANUMERIC = string.ascii_letters + string.digits
ID_LENGTH = 9


def mistral_call_id(call_id: str) -> str:
    """A 9-character id for any call id, the same for the call and its result: the id's
    last 9 letters and digits (as vLLM shortens them), or a digest of a shorter one."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    alnum = re.sub(r"[^A-Za-z0-9]", "", call_id)
    if len(alnum) >= ID_LENGTH:
        return alnum[-ID_LENGTH:]
    return hashlib.sha256(call_id.encode()).hexdigest()[:ID_LENGTH]


class MistralToolParser(JsonToolCallParser):
    name = "mistral"
    architectures = ("MistralForCausalLM", "MixtralForCausalLM")
    template_markers = ("[TOOL_CALLS]",)
    trigger = "[TOOL_CALLS]"
    keep_special_tokens = True
    format = JsonCallFormat(starts=("[TOOL_CALLS]",), lists=True)
    call_prefixes = ('[TOOL_CALLS] [{"name": ',)
    call_suffix = "}]"

    def new_call_id(self) -> str:
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(ID_LENGTH))

    @classmethod
    def prepare_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for message in messages:
            for call in message.get("tool_calls") or ():
                if isinstance(call.get("id"), str):
                    call["id"] = mistral_call_id(call["id"])
            if isinstance(message.get("tool_call_id"), str):
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
        return messages
