"""A 400's message names the field and what is wrong with the value sent, without the
union members pydantic tried (``prompt.list[function-before[...]]``) and without the
complaints of members of another kind than the value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tessellm.server.errors import _readable_errors
from tessellm.server.protocol import ChatCompletionRequest, CompletionRequest


def readable(model: type, **fields) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model(model="m", **fields)
    return [(".".join(loc), message) for loc, message in _readable_errors(info.value.errors())]


def test_an_empty_prompt_is_said_to_be_empty_and_nothing_else() -> None:
    assert readable(CompletionRequest, prompt="") == [
        ("prompt", "String should have at least 1 character")
    ]


@pytest.mark.parametrize("prompt", [[[False]], [1.5], [["a"]], [5, -1], True, {"text": "A"}])
def test_locations_hold_fields_and_indices_only(prompt) -> None:
    lines = readable(CompletionRequest, prompt=prompt)
    assert lines
    for where, message in lines:
        assert where.split(".")[0] == "prompt"
        assert all(part == "prompt" or part.isdigit() for part in where.split(".")), where
        assert message


def test_a_list_prompt_hears_only_what_list_members_say() -> None:
    lines = readable(CompletionRequest, prompt=[5, -1])
    assert ("prompt.1", "Input should be greater than or equal to 0") in lines
    assert all(where != "prompt" for where, _ in lines)  # not "should be a valid string"


def test_nested_fields_keep_their_path() -> None:
    lines = readable(ChatCompletionRequest, messages=[{"role": "wizard", "content": "A"}])
    assert lines[0][0] == "messages.0.role"
