"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} for every failure.

The official clients read `error.message` and `error.param`, so validation failures name the
field there instead of FastAPI's default {"detail": [...]}.

Server errors reveal nothing of the server: the body says "internal error" and the request id
(also in the x-request-id header of every response); the exception goes to the log under it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}
# pydantic error type -> OpenAI-ish error code.
PYDANTIC_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
    "string_too_long": "string_above_max_length",
}


class ApiError(Exception):
    """An error answered to the client as is (status, message, field, code)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_of(request: Request) -> str:
    """The id the request guard (guard.py) gave this request; a fresh one without it."""
    return getattr(request.state, "request_id", None) or new_request_id()


def internal_error(request_id: str) -> ApiError:
    """A 500 that says nothing about the server; log the cause under `request_id`."""
    return ApiError(
        500,
        f"The server had an internal error (request id {request_id}).",
        code="internal_error",
    )


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field ('n', 'size', ...)."""
    first: dict[str, Any] = exc.errors()[0]
    kind = first.get("type", "")
    # loc is ("body", field, ...); invalid JSON has a character offset there, not a field.
    path = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = None if kind == "json_invalid" else ".".join(path) or None
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param is None:
        message = f"Invalid request body: {first.get('msg')}"
    else:
        message = f"Invalid '{param}': {first.get('msg')}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        code = "invalid_type"
    else:
        code = PYDANTIC_CODES.get(kind, "invalid_value")
    return ApiError(400, message, param=param, code=code)


def install(app: FastAPI, on_error: Callable[[int], None] | None = None) -> None:
    """Route every error the app can raise through the OpenAI error body.

    `on_error(status)` hears about API errors (validation included), e.g. to count rejections.
    """

    def answer(error: ApiError) -> JSONResponse:
        if on_error is not None:
            on_error(error.status)
        return error.response()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Anything unexpected: the cause to the log, only the request id to the client. This
        # runs outside the request guard, so the header is set here.
        request_id = request_id_of(request)
        log.error("internal error (request %s)", request_id, exc_info=exc)
        response = answer(internal_error(request_id))
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
