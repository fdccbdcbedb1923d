"""Engines, sessions, migrations and the startup schema check of the SQL registry."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from settings import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
READS_ONLY_OPTION = "diffbank_reads_only"


# The Python package behind each SQLAlchemy PostgreSQL driver name a URL may carry.
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
}


class SchemaNotCurrentError(RuntimeError):
    """The database schema is not the one this code expects."""


class DatabaseDriverMissingError(RuntimeError):
    """The database URL names a driver whose Python package is not installed."""


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys, a busy timeout and BEGIN IMMEDIATE."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        try:
            return create_engine(url, **kwargs)
        except ModuleNotFoundError as exc:
            driver = sa_url.get_dialect().driver
            package = DRIVER_PACKAGES.get(driver, exc.name or driver)
            raise DatabaseDriverMissingError(
                f"the database URL {sa_url.drivername}://... needs the Python package "
                f"{package!r}, which is not installed (pip install '{package}')"
            ) from None
    database = sa_url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions are broken).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if database and database != ":memory:":
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # fails with SQLITE_BUSY (no waiting) when another writer got in between.
        # Sessions that only read (see make_session_factory) skip the lock: in WAL mode a
        # reader never waits for a writer, and readers must not queue behind each other.
        if conn.get_execution_options().get(READS_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine, *, reads_only: bool = False) -> sessionmaker[Session]:
    """Sessions on `engine` that keep loaded rows usable after commit.

    `reads_only` sessions begin SQLite transactions without the write lock; a write in one
    may fail with SQLITE_BUSY under contention, so use them only where nothing is written.
    """
    bind = engine.execution_options(**{READS_ONLY_OPTION: True}) if reads_only else engine
    return sessionmaker(bind=bind, expire_on_commit=False, autoflush=False)


@functools.cache
def engine_for_url(url: str) -> Engine:
    """The process-wide engine for a database URL (made once per URL)."""
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine for the configured database URL."""
    return engine_for_url((settings or get_settings()).database_url)


def get_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """A session factory for the configured database."""
    return make_session_factory(get_engine(settings))


def alembic_config(engine_or_url: Engine | str | None = None) -> Any:
    """An Alembic config for the migrations shipped in this package (independent of cwd)."""
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if isinstance(engine_or_url, str):
        config.set_main_option("sqlalchemy.url", engine_or_url.replace("%", "%%"))
    elif engine_or_url is not None:
        config.attributes["engine"] = engine_or_url
    return config


def head_revision() -> str:
    """The newest migration revision this code ships."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The migration revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    from alembic import command

    engine = _as_engine(engine_or_url)
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine_or_url: Engine | str, revision: str) -> None:
    """Revert migrations down to `revision` ("base" drops everything)."""
    from alembic import command

    command.downgrade(alembic_config(_as_engine(engine_or_url)), revision)


def check_schema_current(engine: Engine) -> None:
    """Raise SchemaNotCurrentError unless the database is at the newest migration."""
    from alembic.script import ScriptDirectory

    expected = head_revision()
    found = current_revision(engine)
    if found == expected:
        return
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if found is not None and found not in known:
        raise SchemaNotCurrentError(
            f"database schema is at {found}, newer than this code knows (it expects "
            f"{expected}): upgrade diffbank instead"
        )
    where = found or ("empty" if not inspect(engine).get_table_names() else "unversioned")
    raise SchemaNotCurrentError(
        f"database schema is at {where}, code expects {expected}: run `diffbank db upgrade`"
    )


def _as_engine(engine_or_url: Engine | str) -> Engine:
    return make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
