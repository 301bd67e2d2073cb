"""Tiny random models for the tool-calling tests: a byte-level tokenizer (any JSON can be
spelled) with a family's special tokens, and chat templates whose tool parts read tools,
assistant ``tool_calls`` and tool results as Qwen 2.5's (Hermes format), Llama 3.1's and
Mistral 7B v0.3's templates do: ``tools`` through ``tojson``, a call's
``function.arguments`` as a dict through ``tojson``, tool results as ``<tool_response>``,
``ipython`` or ``[TOOL_RESULTS]`` turns (Mistral's insisting on 9-character call ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessellm.testing import save_tiny_model, tiny_config

VOCAB = 288  # logits past the tokenizer's ids are padding, never allowed

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}"
    "{% else %}You are a helpful assistant.{% endif %}\n\n# Tools\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n"
    "{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant"
    "{%- if message.content %}\n{{ message.content }}{% endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '\n<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": '
    "{{ tool_call.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user"
    "{%- endif %}\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}'
    "<|start_header_id|>system<|end_header_id|>\n\n"
    '{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
    "{{- system_message }}<|eot_id|>"
    "{%- if tools is not none %}"
    "{%- set first_user_message = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call with its "
    'proper arguments.\n\nRespond in the format {"name": function name, "parameters": '
    "dictionary of argument name and its value}. Do not use variables.\n\n"
    '{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}'
    '{{- first_user_message + "<|eot_id|>" }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' "
    "or 'tool_calls' in message) %}"
    "<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n"
    "{{- message.content | trim }}<|eot_id|>"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls | length == 1 %}"
    '{{- raise_exception("This model only supports single tool-calls at once!") }}'
    "{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "{{ tool_call.name }}", "parameters": {{ tool_call.arguments | tojson }}}'
    "<|eot_id|>"
    "{%- else %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{%- if message.content is mapping or message.content is iterable %}"
    "{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}"
    "<|eot_id|>{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- endif %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if tools is not none and (message == user_messages[-1]) %}[AVAILABLE_TOOLS] ["
    "{%- for tool in tools %}{{ tool | tojson }}{% if not loop.last %}, {% endif %}"
    "{%- endfor %}][/AVAILABLE_TOOLS]{%- endif %}"
    "[INST] {{ message.content }}[/INST]"
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}"
    "[TOOL_CALLS] ["
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.id is not defined or tool_call.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}"
    '{%- set out = tool_call.function | tojson %}{{ out[:-1] }}, "id": "{{ tool_call.id }}"}'
    "{%- if not loop.last %}, {% else %}]{{ eos_token }}{% endif %}"
    "{%- endfor %}"
    "{%- elif message.role == 'assistant' %} {{ message.content | trim }}{{ eos_token }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}"
    '[TOOL_RESULTS] {"content": {{ message.content | string }}, '
    '"call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- endif %}{%- endfor %}"
)

FAMILIES: dict[str, dict[str, Any]] = {
    "hermes": {
        "architecture": "Qwen2ForCausalLM",
        "template": HERMES_TEMPLATE,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "plain": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        "bos": "<|endoftext|>",
        "eos": "<|im_end|>",
        # "auto" tests: a logit bias makes the random model start a call with this token;
        # generation stops after the call.
        "call_token": "<tool_call>",
        "call_end": "</tool_call>",
    },
    "llama3_json": {
        "architecture": "LlamaForCausalLM",
        "template": LLAMA31_TEMPLATE,
        "special": [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        "plain": [],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "call_token": "<|python_tag|>",
        "call_end": "}}",  # the arguments' and the call's closing braces (flat arguments)
    },
    "mistral": {
        "architecture": "MistralForCausalLM",
        "template": MISTRAL_TEMPLATE,
        "special": [
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
        "plain": [],
        "bos": "<s>",
        "eos": "</s>",
        "call_token": "[TOOL_CALLS]",
        "call_end": "}]",
    },
}


def byte_tokenizer(family: dict[str, Any]) -> Any:
    """Every byte a token (no merges), then the family's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in family["special"]])
    tok.add_tokens([AddedToken(t, special=False) for t in family["plain"]])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family["bos"], eos_token=family["eos"]
    )
    fast.chat_template = family["template"]
    return fast


def tiny_tool_model(name: str, path: Path) -> Path:
    """A random tiny model of the family ``name`` whose tokenizer has its tool template."""
    family = FAMILIES[name]
    tokenizer = byte_tokenizer(family)
    config = tiny_config(
        family["architecture"],
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.convert_tokens_to_ids(family["bos"]),
        eos_token_id=tokenizer.convert_tokens_to_ids(family["eos"]),
    )
    save_tiny_model(config, path)
    tokenizer.save_pretrained(path)  # over the word-level one save_tiny_model writes
    return path


# -- tools of the tests: bounded values, so a random model's constrained answer is short --

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "loud": {"type": "boolean"},
            },
            "required": ["hour", "loud"],
            "additionalProperties": False,
        },
        "strict": True,  # the SDK's stream helper parses strict tools' arguments only
    },
}
TOOLS = [WEATHER, ALARM]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# Compact JSON: a grammar that admits whitespace anywhere lets a random model spend its
# budget there.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
MAX_TOKENS = 120  # a constrained call of these tools is ~60 tokens


def chat(client: Any, **kwargs: Any) -> Any:
    """A greedy, compact chat completion with the test tools (kwargs override)."""
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("tools", TOOLS)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="", extra_body=COMPACT, **kwargs)


def auto_call_kwargs(family: str) -> dict:
    """Sampling that makes the random model start a call (a logit bias on the call's first
    token), keeps it off whitespace where the grammar lets it choose, and stops after one
    call: what it writes in between is the grammar's doing. (xgrammar's structural tags
    ignore ``disable_any_whitespace``, hence the bias against whitespace.)"""
    tokenizer = byte_tokenizer(FAMILIES[family])
    bias = {tokenizer.convert_tokens_to_ids(FAMILIES[family]["call_token"]): 100}
    for space in ("Ġ", "Ċ", "ĉ", "č"):  # byte-level " ", "\n", "\t", "\r"
        bias[tokenizer.convert_tokens_to_ids(space)] = -100
    return dict(
        logit_bias={str(k): v for k, v in bias.items()},
        stop=[FAMILIES[family]["call_end"]],
        extra_body={"include_stop_str_in_output": True},
    )


def check_call(call: Any) -> dict[str, Any]:
    """The call's arguments, checked against its tool's schema."""
    import jsonschema

    assert call.type == "function"
    # OpenAI's "call_" ids; Mistral's parser makes the 9-character ids its templates take.
    assert (call.id.startswith("call_") and len(call.id) == 29) or (
        len(call.id) == 9 and call.id.isalnum()
    )
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def accumulate(chunks: Any) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """Content, calls and finish reason of a stream, put together as the SDK documents:
    calls by ``index``, the first delta naming the call, arguments appended."""
    content: str | None = None
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for call in delta.tool_calls or ():
                if call.id is not None:
                    assert call.index not in calls, "a call's id is sent once"
                    assert call.function.arguments == ""
                    calls[call.index] = {"id": call.id, "name": call.function.name, "args": ""}
                else:
                    assert call.function.name is None
                calls[call.index]["args"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish
