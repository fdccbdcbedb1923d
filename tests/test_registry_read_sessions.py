"""Read-only sessions on SQLite never queue behind the write lock."""

from __future__ import annotations

import threading
import time

from sqlalchemy import text

from registry.db import make_engine, make_session_factory, upgrade


def test_a_read_session_reads_while_a_writer_holds_the_lock(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    upgrade(engine)
    writer = make_session_factory(engine)()
    reader = make_session_factory(engine, reads_only=True)()
    with writer.begin():
        writer.execute(
            text("INSERT INTO tenants (name, created_at) VALUES ('a', CURRENT_TIMESTAMP)")
        )
        started = time.monotonic()
        with reader.begin():
            count = reader.execute(text("SELECT count(*) FROM tenants")).scalar_one()
        waited = time.monotonic() - started
    assert count == 0  # the writer has not committed yet
    assert waited < 1.0  # a locking reader would wait for the 30 s busy timeout


def test_a_write_session_still_waits_for_the_write_lock(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    upgrade(engine)
    first = make_session_factory(engine)()
    second = make_session_factory(engine)()
    acquired = threading.Event()

    def second_writer() -> None:
        with second.begin():
            second.execute(text("SELECT 1"))
            acquired.set()

    with first.begin():
        first.execute(text("SELECT 1"))
        thread = threading.Thread(target=second_writer)
        thread.start()
        assert not acquired.wait(0.5)  # blocked while the first writer holds the lock
    thread.join(10)
    assert acquired.is_set()
