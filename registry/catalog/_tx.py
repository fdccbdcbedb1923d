"""Transaction helpers shared by catalog modules."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

T = TypeVar("T")


def get_or_create(
    session: Session, find: Callable[[], T | None], create: Callable[[], T], *, attempts: int = 3
) -> T:
    """Find a row or insert it, each try in its own transaction; a racing insert is re-read."""
    for attempt in range(attempts):
        try:
            with transaction(session):
                found = find()
                if found is not None:
                    return found
                row = create()
                session.add(row)
                session.flush()
                return row
        except IntegrityError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def transaction(session: Session) -> SessionTransaction:
    """`session.begin()`, first ending a transaction the session began implicitly.

    A rollback expires every loaded row; touching one afterwards (e.g. `tenant.id`) makes the
    session begin a transaction on its own, and a plain `session.begin()` would then fail.
    That implicit transaction only read, so it is committed (ended) here.
    """
    if session.in_transaction():
        session.commit()
    return session.begin()


def lock_object_key(session: Session, key: str) -> None:
    """Serialise, per blob key, "no row names it, delete it" against inserting a row naming it.

    PostgreSQL: a transaction-scoped advisory lock on the key. SQLite needs none: its write
    transactions begin IMMEDIATE and so already exclude each other.
    """
    if session.get_bind().dialect.name == "postgresql":
        lock_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": lock_id})
