"""The registry's change epoch: what lets every API process drop cached keys and versions.

Every catalog change to what the API caches (a key revoked; a version published, activated or
deleted) calls `bump_change_epoch` inside its own transaction, so the new epoch commits
atomically with the change. Processes re-read it with `read_change_epoch` (one primary-key
SELECT) and drop their entries when it moved. In the committing process itself, watchers
registered with `watch_local_changes` are told at commit, so its own changes apply at once.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from registry.models import GLOBAL_EPOCH_ID, ChangeEpoch

_BUMPED = "diffbank_change_epoch_bumped"  # session.info flag: this transaction bumped it


class LocalWatcher(Protocol):
    """Anything told, after a commit in this process that bumped the epoch, to re-read it."""

    def expire(self) -> None:
        """Re-read the epoch before the next cached answer."""


_watchers: weakref.WeakSet[LocalWatcher] = weakref.WeakSet()


def watch_local_changes(watcher: LocalWatcher) -> None:
    """Call `watcher.expire()` after each commit in this process that bumps the epoch."""
    _watchers.add(watcher)


def bump_change_epoch(session: Session) -> None:
    """Increment the epoch in the session's transaction (creating the row if it is missing)."""
    table = ChangeEpoch.__table__
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        session.execute(
            insert(table)
            .values(id=GLOBAL_EPOCH_ID, epoch=1)
            .on_conflict_do_update(index_elements=[table.c.id], set_={"epoch": table.c.epoch + 1})
        )
    else:
        session.execute(
            update(table).where(table.c.id == GLOBAL_EPOCH_ID).values(epoch=table.c.epoch + 1)
        )
    session.info[_BUMPED] = True


def read_change_epoch(session: Session) -> int:
    """The committed epoch (0 before any change)."""
    value = session.scalar(select(ChangeEpoch.epoch).where(ChangeEpoch.id == GLOBAL_EPOCH_ID))
    return int(value or 0)


@event.listens_for(Session, "after_commit")
def _tell_local_watchers(session: Session) -> None:
    if session.info.pop(_BUMPED, False):
        for watcher in list(_watchers):
            watcher.expire()


@event.listens_for(Session, "after_rollback")
def _forget_bump(session: Session) -> None:
    session.info.pop(_BUMPED, None)
