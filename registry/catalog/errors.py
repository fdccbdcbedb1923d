"""Errors raised by catalog operations; each names the field or entity at fault."""

from __future__ import annotations


class CatalogError(Exception):
    """Base class: `code` is machine-readable, `field` names the offending input if any."""

    code = "catalog_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code


class NotFoundError(CatalogError, LookupError):
    """The entity does not exist (or belongs to another tenant: same answer)."""

    code = "not_found"


class ConflictError(CatalogError):
    """The request contradicts the current state (duplicate name, in use, wrong state)."""

    code = "conflict"


class InvalidInputError(CatalogError, ValueError):
    """An argument has an unacceptable value."""

    code = "invalid"
