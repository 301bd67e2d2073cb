"""A request's output constraint: its ``response_format``, ``structured_outputs`` or
``guided_*`` fields → :class:`~tessellm.sampling_params.StructuredOutputsParams`.

Mapping (OpenAI's names, then vLLM's):

- ``response_format``: ``{"type": "text"}`` → none; ``{"type": "json_object"}`` →
  ``json_object=True``; ``{"type": "json_schema", "json_schema": {"schema": S}}`` →
  ``json=S`` (without ``schema``: ``json_object=True``); vLLM's ``{"type":
  "structural_tag", "structures": [...], "triggers": [...]}`` → ``structural_tag`` (its
  JSON text).
- ``structured_outputs``: ``json``, ``regex``, ``choice``, ``grammar``, ``json_object``,
  ``structural_tag`` as named; its ``disable_any_whitespace`` and ``backend`` apply to the
  request's constraint wherever it came from.
- ``guided_json``/``guided_regex``/``guided_choice``/``guided_grammar`` → ``json``/
  ``regex``/``choice``/``grammar``; ``guided_decoding_backend`` → ``backend``.
  ``guided_whitespace_pattern`` (and ``structured_outputs.whitespace_pattern``) is accepted
  and ignored, as vLLM's xgrammar and guidance backends do.

A request gets at most one constraint: two (say ``response_format`` and ``guided_regex``)
are a 400 naming both. Other features that constrain the output (tool calling) add theirs
as an ``extra`` :class:`Constraint`, and the same rule applies to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tessellm.errors import InvalidRequestError
from tessellm.sampling_params import SamplingParams, StructuredOutputsParams
from tessellm.server.context import ServerContext
from tessellm.server.errors import APIError, bad_request
from tessellm.server.protocol import (
    JsonObjectResponseFormat,
    JsonSchemaResponseFormat,
    StructuralTagResponseFormat,
    StructuredOutputFields,
)

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True, slots=True)
class Constraint:
    """One constraint a request asks for: ``kind`` is a field of
    :class:`StructuredOutputsParams` and ``value`` its value; ``param`` names the request
    field it came from (errors name it)."""

    param: str
    kind: str
    value: Any


def _top_level(param: str) -> str:
    return param.split(".", 1)[0].split(" ", 1)[0]


def _response_format_constraint(body: StructuredOutputFields) -> Constraint | None:
    fmt = body.response_format
    if isinstance(fmt, JsonObjectResponseFormat):
        return Constraint("response_format (json_object)", "json_object", True)
    if isinstance(fmt, JsonSchemaResponseFormat):
        schema = fmt.json_schema.schema_
        if schema is None:
            return Constraint("response_format (json_schema)", "json_object", True)
        return Constraint("response_format (json_schema)", "json", schema)
    if isinstance(fmt, StructuralTagResponseFormat):
        tag = fmt.model_dump(by_alias=True)
        return Constraint("response_format (structural_tag)", "structural_tag", json.dumps(tag))
    return None  # absent, or {"type": "text"}


def _checked_value(constraint: Constraint) -> Any:
    """The value, with JSON text parsed where the kind takes JSON; errors name the field."""
    value = constraint.value
    if constraint.kind not in ("json", "structural_tag"):
        return value
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"not valid JSON ({exc})") from None
    if constraint.kind == "structural_tag":
        if not isinstance(parsed, dict):
            raise InvalidRequestError("a structural tag is a JSON object")
        return value
    if not isinstance(parsed, dict | bool):
        raise InvalidRequestError("a JSON schema is a JSON object")
    return parsed


def request_constraints(body: StructuredOutputFields) -> list[Constraint]:
    """Every constraint ``body`` asks for, in the order its fields are listed."""
    found = []
    from_format = _response_format_constraint(body)
    if from_format is not None:
        found.append(from_format)
    so = body.structured_outputs
    if so is not None:
        values = {kind: getattr(so, "json_" if kind == "json" else kind) for kind in KINDS}
        for kind, value in values.items():
            if value is None or value is False:
                continue
            if kind == "structural_tag" and isinstance(value, dict):
                value = json.dumps(value)
            found.append(Constraint(f"structured_outputs.{kind}", kind, value))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            found.append(Constraint(f"guided_{kind}", kind, value))
    return found


def request_backend(body: StructuredOutputFields) -> str | None:
    """The grammar backend the request names (``None``: the server's default)."""
    named = body.structured_outputs.backend if body.structured_outputs else None
    legacy = body.guided_decoding_backend
    if named is not None and legacy is not None and named != legacy:
        raise bad_request(
            f"structured_outputs.backend ({named!r}) and guided_decoding_backend "
            f"({legacy!r}) name different backends",
            param="structured_outputs",
        )
    return named or legacy


def request_constraint(
    body: StructuredOutputFields, extra: Sequence[Constraint] = ()
) -> Constraint | None:
    """The request's one constraint (``extra``: those of other request fields, such as
    tool calling), or ``None`` when its output is free; a 400 naming them for more than
    one."""
    constraints = [*request_constraints(body), *extra]
    if len(constraints) > 1:
        names = [c.param for c in constraints]
        raise bad_request(
            "a request takes one output constraint; this one has "
            f"{', '.join(names[:-1])} and {names[-1]}",
            param=_top_level(names[1]),
        )
    return constraints[0] if constraints else None


def structured_outputs_of(
    body: StructuredOutputFields, extra: Sequence[Constraint] = ()
) -> StructuredOutputsParams | None:
    """The request's :class:`StructuredOutputsParams`, or ``None`` when its output is
    free: a 400 for more than one constraint, or one that is malformed (JSON text that
    does not parse, a schema that is not an object). Whether a schema, regex or grammar
    compiles is for the engine to say (:func:`constrain`)."""
    backend = request_backend(body)
    constraint = request_constraint(body, extra)
    if constraint is None:
        return None
    so = body.structured_outputs
    try:
        return StructuredOutputsParams(
            **{constraint.kind: _checked_value(constraint)},
            disable_any_whitespace=bool(so and so.disable_any_whitespace),
            backend=backend,
        )
    except InvalidRequestError as exc:
        raise bad_request(f"{constraint.param}: {exc}", _top_level(constraint.param)) from None
    except RecursionError:
        message = f"{constraint.param}: the schema is nested too deeply"
        raise bad_request(message, _top_level(constraint.param)) from None


async def constrain(
    ctx: ServerContext,
    body: StructuredOutputFields,
    params: SamplingParams,
    extra: Sequence[Constraint] = (),
) -> SamplingParams:
    """``params`` with the request's constraint (as they are when it has none), its
    grammar compiled by the engine (cached, off the event loop): a schema, regex or
    grammar that does not compile, or an unknown backend, is a 400 naming the problem
    before the request is added, never a failure in the step loop."""
    structured = structured_outputs_of(body, extra)
    if structured is None:
        return params
    params = replace(params, structured_outputs=structured)
    try:
        await ctx.engine.prepare_structured(params)
    except InvalidRequestError as exc:
        raise _compile_error(exc, body, request_constraint(body, extra)) from None
    return params


def _compile_error(
    exc: InvalidRequestError, body: StructuredOutputFields, constraint: Constraint | None
) -> APIError:
    """The engine names the offline API's field (``structured_outputs.json: ...``); the
    client is told the field it sent."""
    message = str(exc)
    if constraint is None or "backend" in message.split(":", 1)[0]:  # not the constraint's
        so = body.structured_outputs
        param = "guided_decoding_backend" if body.guided_decoding_backend else None
        return bad_request(message, "structured_outputs" if so and so.backend else param)
    engine_name = f"structured_outputs.{constraint.kind}:"
    if message.startswith(engine_name):
        message = f"{constraint.param}:{message[len(engine_name) :]}"
    return bad_request(message, _top_level(constraint.param))
