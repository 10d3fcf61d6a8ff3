"""Every error the API answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Clients (the `openai` SDK first) read `error.message` and map the status to an exception
class, so no error may leave in FastAPI's own shape, and no 422 may leave at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from frontend.engine_client import EngineError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the frontend itself answers (bad input, unknown model, missing API key)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.param = param
        self.code = code
        self.headers = headers

    @classmethod
    def from_validation(cls, errors: Sequence[Mapping[str, Any]]) -> APIError:
        message, param = describe_validation_errors(errors)
        return cls(400, message, param=param)


def error_type_for(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    error_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, error_type or error_type_for(status), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def response_for(error: APIError | EngineError) -> JSONResponse:
    if isinstance(error, APIError):
        return error_response(
            error.status, error.message, error.error_type, error.param, error.code, error.headers
        )
    return error_response(error.status, error.message, error.error_type, error.param, headers=error.headers)


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One client-readable message (and the `param` it is about) for pydantic's error list.

    Only the first error is described: it is the one the client fixes first, and a message
    listing every failed branch of a union reads as noise.
    """
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        suffix = f": {detail}" if detail else ""
        return f"We could not parse the JSON body of your request{suffix}.", None
    if not loc:
        return "The request body must be a JSON object.", None
    param = _param_name(loc)
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid '{param}': {first.get('msg', 'invalid value')}.", param


def _param_name(loc: Sequence[str | int]) -> str:
    """OpenAI's spelling of a location: `messages[0].content`."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception that can reach the client in OpenAI's error shape."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError | EngineError)
        return response_for(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | pydantic.ValidationError)
        return response_for(APIError.from_validation(exc.errors()))

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = 400 if exc.status_code == 422 else exc.status_code
        return error_response(status, str(exc.detail), headers=exc.headers)

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(EngineError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(pydantic.ValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
