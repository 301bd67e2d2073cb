"""The tool-calling parts of the chat API's bodies (OpenAI's function tools), used by
``protocol.py``: tool definitions, ``tool_choice``, the calls of an assistant message in
the conversation, and the calls of an answer (whole, and as stream deltas)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

# OpenAI's rule for a function's name; it also keeps names safe to splice into the JSON
# that chat templates write around them.
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
MAX_TOOLS = 128  # OpenAI's limit


class _Request(BaseModel):
    # The strictness of protocol.RequestModel (not imported: protocol imports this module).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of type object: the function's arguments."
    )
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
Tools = Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)]


class CalledFunction(_Request):
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class MessageToolCall(_Request):
    """A call in an assistant message of the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


# -- responses ---------------------------------------------------------------------------


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _WithoutNulls(BaseModel):
    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A delta carries only what it adds (the SDK appends strings it is sent).
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_WithoutNulls):
    """A call's first delta has ``id``, ``type`` and ``function.name`` (and empty
    arguments); later ones only ``index`` and an arguments fragment."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
