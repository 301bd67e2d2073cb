"""Request and response bodies of the OpenAI API, as pydantic models.

Field names, defaults and ranges follow OpenAI's API reference; the few extra sampling
fields vLLM accepts (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos`` ...) are
accepted too, so clients can pass them with the SDK's ``extra_body``. Unknown fields are
ignored, as OpenAI-compatible servers commonly do.

Request bodies are validated strictly: every number is bounded and finite (a JSON
``Infinity`` or ``NaN`` is a 400), a boolean is ``true`` or ``false`` (not ``"yes"`` nor
``1``) and an integer is an integer (not ``false`` nor ``"3"``; ``3.0`` is one, as JSON
Schema counts it). What depends on the model
(token ids within its vocabulary, ``top_k`` up to its size) the engine checks.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from tessellm.sampling_params import MAX_COUNT, MAX_SEED, MAX_TOKEN_ID
from tessellm.server.protocol_tools import (
    DeltaToolCall,
    MessageToolCall,
    ToolCallOut,
    ToolChoice,
    Tools,
)

MAX_N = 128
MAX_STOP_SEQUENCES = 16
MAX_TOKEN_LIST = 1024  # stop_token_ids and logit_bias entries


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 3.0 (as does the schema this API publishes); the
    # strict check after this still refuses true, "3" and 3.5.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def bounded_int(low: int, high: int) -> Any:
    """An integer in ``[low, high]``. The bounds come before the validator: after it,
    pydantic would publish them as non-standard "ge"/"le" keys in the schema."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral)]


Count = bounded_int(1, MAX_COUNT)
TokenId = bounded_int(0, MAX_TOKEN_ID)
NumChoices = bounded_int(1, MAX_N)
Seed = bounded_int(0, MAX_SEED)
TopK = bounded_int(-1, MAX_TOKEN_ID)
MinTokens = bounded_int(0, MAX_COUNT)
NumLogprobs = bounded_int(0, 20)
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]
StopField = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None


class RequestModel(BaseModel):
    # Strict: no "yes" for true, no false for 0; and no JSON Infinity/NaN for a number.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(RequestModel):
    include_usage: bool = False


# -- structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_* --

MAX_CHOICES = 4096
MAX_CONSTRAINT_CHARS = 1 << 20  # one regex, grammar or structural tag: 1 MiB of text
MAX_NAME_CHARS = 256

ConstraintText = Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]
Choices = Annotated[
    list[Annotated[str, Field(max_length=MAX_CONSTRAINT_CHARS)]],
    Field(min_length=1, max_length=MAX_CHOICES),
]
BackendName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
# A JSON schema: an object, or its JSON text (vLLM's guided_json takes both).
SchemaField = dict[str, Any] | Annotated[str, Field(max_length=MAX_CONSTRAINT_CHARS)]


class TextResponseFormat(RequestModel):
    type: Literal["text"]


class JsonObjectResponseFormat(RequestModel):
    type: Literal["json_object"]


class JsonSchemaSpec(RequestModel):
    # OpenAI requires a name; it names the schema only, so one left out is not an error.
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    description: str | None = None
    # "schema" would shadow BaseModel.schema(), hence the alias.
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="The JSON schema; left out: any JSON object."
    )
    strict: bool | None = None


class JsonSchemaResponseFormat(RequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class StructuralTagItem(RequestModel):
    begin: ConstraintText
    schema_: dict[str, Any] = Field(alias="schema")
    end: str


class StructuralTagResponseFormat(RequestModel):
    """vLLM's structural tag: free text until a trigger, then the structure whose
    ``begin`` starts with it, its content constrained to ``schema``, up to ``end``."""

    type: Literal["structural_tag"]
    structures: Annotated[list[StructuralTagItem], Field(min_length=1, max_length=MAX_CHOICES)]
    triggers: Annotated[list[ConstraintText], Field(min_length=1, max_length=MAX_CHOICES)]


ResponseFormat = Annotated[
    TextResponseFormat
    | JsonObjectResponseFormat
    | JsonSchemaResponseFormat
    | StructuralTagResponseFormat,
    Field(discriminator="type"),
]


class StructuredOutputsRequest(RequestModel):
    """vLLM's ``structured_outputs`` extra field: one constraint, and options that also
    apply to a ``response_format`` constraint."""

    # "json" would shadow BaseModel.json(), hence the alias.
    json_: SchemaField | None = Field(None, alias="json")
    regex: ConstraintText | None = None
    choice: Choices | None = None
    grammar: ConstraintText | None = None
    json_object: bool | None = None
    structural_tag: ConstraintText | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    backend: BackendName | None = None
    whitespace_pattern: str | None = Field(
        None, description="Accepted for vLLM compatibility; the backends ignore it."
    )


class StructuredOutputFields(RequestModel):
    """How to constrain the output: OpenAI's ``response_format``, vLLM's
    ``structured_outputs``, or vLLM's older ``guided_*`` fields (at most one constraint)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: SchemaField | None = None
    guided_regex: ConstraintText | None = None
    guided_choice: Choices | None = None
    guided_grammar: ConstraintText | None = None
    guided_decoding_backend: BackendName | None = None
    guided_whitespace_pattern: str | None = Field(
        None, description="Accepted for vLLM compatibility; the backends ignore it."
    )


class SamplingFields(StructuredOutputFields):
    """Sampling fields shared by completions and chat completions."""

    model: str | None = Field(None, description="Served model name; defaults to the first one.")
    n: NumChoices = 1
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
            Field(max_length=MAX_TOKEN_LIST),
        ]
        | None
    ) = None
    user: str | None = None
    # vLLM's extra sampling fields.
    top_k: TopK | None = Field(None, description="-1 or 0: off; at most the vocabulary size.")
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_LIST)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(SamplingFields):
    prompt: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Count | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: NumChoices | None = None


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImageURL(RequestModel):
    url: str  # a data URL (data:image/png;base64,...); http(s) only for allowed hosts
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message's call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # Image parts are placeholders by then (server/images.py), or refused.
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = Field(None, description="Deprecated by OpenAI; still honoured.")
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = Field(None, description="Default: auto with tools.")
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True


# -- responses ---------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _calls_if_any(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what a delta adds: {"role": ...} first, then {"content": ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tessellm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
