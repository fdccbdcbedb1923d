"""JSON errors `{"error": {"code", "message", "field"}}` for every 4xx/5xx the API answers."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Location prefixes FastAPI puts in front of a field path; the client only needs the field.
_LOCATION_PREFIXES = {"body", "query", "path", "header", "cookie"}


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with the given HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def not_found(what: str, ident: object, *, field: str | None = None) -> ApiError:
    """404 for an entity that does not exist or belongs to another tenant (same answer)."""
    return ApiError(404, "not_found", f"{what} {ident!r} not found", field=field)


def conflict(code: str, message: str, *, field: str | None = None) -> ApiError:
    """409 for a request that contradicts the current state."""
    return ApiError(409, code, message, field=field)


def invalid(code: str, message: str, *, field: str | None = None) -> ApiError:
    """422 for a well-formed request with an unacceptable value."""
    return ApiError(422, code, message, field=field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message, "field": field}}


def field_path(loc: tuple | list) -> str | None:
    """`("body", "inputs", 3)` -> `"inputs.3"`; the location prefix is dropped."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOCATION_PREFIXES:
        parts = parts[1:]
    return ".".join(parts) or None


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(
        error_body(exc.code, exc.message, exc.field), status_code=exc.status, headers=exc.headers
    )


async def _validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    if field:
        message = f"{field}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return JSONResponse(error_body("validation_error", message, field), status_code=422)


async def _http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _status_code_name(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return JSONResponse(
        error_body(code, message), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer ApiError, validation errors and Starlette's HTTP errors in the one JSON shape."""
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
