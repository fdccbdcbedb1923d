"""Ids from users are checked against the column range before they reach the database."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.orm import Session

MAX_ID = 2**31 - 1  # INTEGER on PostgreSQL; larger values overflow the driver or the column
T = TypeVar("T")


def in_id_range(value: Any) -> bool:
    """Whether `value` is an int any row id (or version number) could have."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def get_row(session: Session, model: type[T], row_id: Any, **kwargs: Any) -> T | None:
    """`session.get`, but None for ids no row can have (instead of a driver overflow)."""
    if not in_id_range(row_id):
        return None
    return session.get(model, row_id, **kwargs)
