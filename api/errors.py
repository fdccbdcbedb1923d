"""JSON errors `{"error": {"code", "message", "field"}}` for every 4xx/5xx the API answers."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Location prefixes FastAPI puts in front of a field path; the client only needs the field.
_LOCATION_PREFIXES = {"body", "query", "path", "header", "cookie"}


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with the given HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
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


def artifact_mismatch(
    name: str, number: int, exc: Exception, *, cannot: str, field: str = "version"
) -> ApiError:
    """409 for a task version whose stored artifact cannot be used (an `ArtifactError`):
    `task 'x' version 3 cannot be {cannot}: {exc}`."""
    return conflict(
        "artifact_mismatch",
        f"task {name!r} version {number} cannot be {cannot}: {exc}",
        field=field,
    )


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
    if first.get("type") == "json_invalid":  # not a JSON document at all: malformed, not invalid
        reason = (first.get("ctx") or {}).get("error", "a JSON decode error")
        message = f"the request body is not valid JSON ({reason})"
        return JSONResponse(error_body("malformed_json", message, "body"), status_code=400)
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
        error_body(code, message),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


# Catalog error classes -> HTTP status (looked up along the exception's MRO).
_CATALOG_STATUS = {"NotFoundError": 404, "ConflictError": 409, "InvalidInputError": 422}
# Dataset error codes that are not 422.
_DATASET_STATUS = {"too_large": 413}


async def _catalog_error_handler(_: Request, exc: Exception) -> JSONResponse:
    status = next(
        (_CATALOG_STATUS[c.__name__] for c in type(exc).__mro__ if c.__name__ in _CATALOG_STATUS),
        400,
    )
    return JSONResponse(
        error_body(exc.code, exc.message, exc.field),
        status_code=status,  # type: ignore[attr-defined]
    )


async def _dataset_error_handler(_: Request, exc: Exception) -> JSONResponse:
    code = exc.code  # type: ignore[attr-defined]
    field = exc.field or "file"  # type: ignore[attr-defined]
    return JSONResponse(
        error_body(code, str(exc), field), status_code=_DATASET_STATUS.get(code, 422)
    )


async def _store_error_handler(request: Request, exc: Exception) -> JSONResponse:
    from registry.stores import ObjectIntegrityError, ObjectNotFound

    # The detail names store locations and keys: it goes to the log, not to the caller.
    log.error("object store error on %s %s: %s", request.method, request.url.path, exc)
    if isinstance(exc, ObjectNotFound):  # most often deleted meanwhile by another request
        message = "the stored file of this resource is gone (deleted meanwhile?); retry"
        return JSONResponse(error_body("object_missing", message), status_code=409)
    if isinstance(exc, ObjectIntegrityError):
        message = "a stored file failed its checksum; the operator has the details"
        return JSONResponse(error_body("integrity_error", message), status_code=500)
    message = "the object store failed; the operator has the details"
    return JSONResponse(error_body("store_error", message), status_code=500)


async def _integrity_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # A concurrent change won the race (e.g. a dataset deleted while a job on it was made).
    log.warning("integrity error on %s %s: %s", request.method, request.url.path, exc)
    message = "another request changed what this one refers to; look again and retry"
    return JSONResponse(error_body("conflict", message), status_code=409)


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    message = "the server failed on this request; the operator has the details"
    return JSONResponse(error_body("internal_error", message), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error (ours, the registry's, FastAPI's) in the one JSON shape."""
    from datasets_io.tabular import DatasetError
    from registry.catalog.errors import CatalogError
    from registry.stores import ObjectStoreError

    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(CatalogError, _catalog_error_handler)
    app.add_exception_handler(DatasetError, _dataset_error_handler)
    app.add_exception_handler(ObjectStoreError, _store_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(IntegrityError, _integrity_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)  # the JSON shape, no trace
