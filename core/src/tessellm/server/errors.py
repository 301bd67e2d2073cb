"""Every error leaves the server in OpenAI's shape: ``{"error": {message, type, param, code}}``.

Bad input is always a 4xx: FastAPI's 422 validation errors become 400 as OpenAI returns,
and the engine's ``InvalidRequestError`` becomes 400 too. Only a bug gives a 500.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessellm.engine.async_engine import EngineDeadError
from tessellm.errors import EngineSleepingError, InvalidRequestError

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to return to the client as is."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        all_headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        all_headers.update(self.headers)
        all_headers.update(headers or {})
        return JSONResponse(self.body(), status_code=self.status, headers=all_headers or None)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def to_api_error(exc: BaseException) -> APIError:
    """The client-facing form of any exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError | EngineSleepingError):
        return APIError(503, str(exc), error_type="service_unavailable_error")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", error_type="server_error")


# Pydantic names the member of a union it tried (``constrained-str``,
# ``list[function-before[...]]``) inside an error's location; field names never look so.
_UNION_MEMBER = re.compile(r"[\[\]-]|^(str|int|float|bool|list|dict|none)$")


def _is_union_member(part: Any) -> bool:
    return isinstance(part, str) and bool(_UNION_MEMBER.search(part))


def _readable_errors(details: list[dict]) -> list[tuple[list[str], str]]:
    """(location, message) per error, a union's members left out of locations and only
    the members of the value's own kind kept: ``"prompt": ""`` says the string is empty,
    not also that it is not a list of strings, of token ids and of token-id lists."""
    fields: dict[tuple, list[tuple[Any, list, dict]]] = {}  # in the errors' order
    for item in details:
        loc = [x for x in item.get("loc", ()) if x != "body"]
        cut = next((i for i, part in enumerate(loc) if _is_union_member(part)), None)
        key = tuple(loc) if cut is None else tuple(loc[:cut])
        member = None if cut is None else loc[cut]
        fields.setdefault(key, []).append((member, [] if cut is None else loc[cut + 1 :], item))
    readable: list[tuple[list[str], str]] = []
    for key, entries in fields.items():
        # The field's own value: an error at the member's top has it as its input.
        tops = [item for member, rest, item in entries if member and not rest]
        if tops and all(member for member, _, _ in entries):
            is_list = isinstance(tops[0].get("input"), list)
            same_kind = [e for e in entries if str(e[0]).startswith("list[") == is_list]
            entries = same_kind or entries
        for _, rest, item in entries:
            line = (
                [str(x) for x in key] + [str(x) for x in rest],
                item.get("msg", "invalid value"),
            )
            if line not in readable:
                readable.append(line)
    return readable


def _validation_error(exc: RequestValidationError) -> APIError:
    details = exc.errors()
    if not details:
        return bad_request("invalid request body")
    if details[0].get("type") == "json_invalid":
        return _json_error(details[0], exc.body)
    readable = _readable_errors(list(details))
    parts = [f"{'.'.join(loc) or 'body'}: {message}" for loc, message in readable[:5]]
    first_loc = readable[0][0]
    param = first_loc[0] if first_loc else None
    return bad_request("; ".join(parts), param=param)


def _json_error(detail: dict[str, Any], document: Any) -> APIError:
    """Where a body is not JSON, as the decoder says it (FastAPI gives only the offset)."""
    reason = (detail.get("ctx") or {}).get("error") or "not valid JSON"
    loc = detail.get("loc") or ()
    offset = loc[-1] if loc and isinstance(loc[-1], int) else None
    if offset is None or not isinstance(document, str):
        return bad_request(f"invalid JSON: {reason}")
    line = document.count("\n", 0, offset) + 1
    column = offset - document.rfind("\n", 0, offset)
    return bad_request(f"invalid JSON at line {line} column {column}: {reason}")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return bad_request(str(exc)).response()

    async def on_engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        # Kept headers: a 405 names the allowed methods in "Allow", as HTTP requires.
        error = APIError(
            exc.status_code,
            message,
            error_type=ERROR_TYPES.get(exc.status_code),
            headers=dict(exc.headers or {}),
        )
        return error.response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    app.add_exception_handler(APIError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidRequestError, on_invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(EngineDeadError, on_engine_dead)  # type: ignore[arg-type]
    app.add_exception_handler(EngineSleepingError, on_engine_dead)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
