"""Opaque cursors for keyset pagination over ids, newest first."""

from __future__ import annotations

import base64
import json
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from registry.catalog._ids import in_id_range
from registry.catalog.errors import InvalidInputError

MAX_PAGE_SIZE = 500
T = TypeVar("T")


def encode_cursor(last_id: int) -> str:
    """An opaque cursor that continues after row `last_id`."""
    raw = json.dumps({"before": last_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The row id a cursor continues after; InvalidInputError(field="cursor") if malformed."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))["before"]
        if not in_id_range(value):
            raise ValueError
        return value
    except (ValueError, KeyError, TypeError, UnicodeError):
        raise InvalidInputError("cursor is not one this server gave out", field="cursor") from None


def check_limit(limit: int) -> int:
    """The page size, or InvalidInputError(field="limit") outside 1..MAX_PAGE_SIZE."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE_SIZE}", field="limit")
    return limit


def paginate(
    session: Session, query: Select[Any], id_column: Any, *, cursor: str | None, limit: int
) -> tuple[list[Any], str | None]:
    """One page of `query` ordered by id descending, and the cursor of the next page."""
    limit = check_limit(limit)
    if cursor is not None:
        query = query.where(id_column < decode_cursor(cursor))
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)).unique())
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].id)
    return rows, None
