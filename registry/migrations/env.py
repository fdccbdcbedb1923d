"""Alembic environment: runs the registry migrations on the engine or URL the caller gave."""

from __future__ import annotations

from typing import Any

from alembic import context

from registry.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render the UTC timestamp type as the plain SQL type it stores."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=render_item,
        compare_type=True,
    )


def run_migrations_online() -> None:
    """Run migrations on a live connection."""
    engine = config.attributes.get("engine")
    if engine is None:
        from registry.db import make_engine

        url = config.get_main_option("sqlalchemy.url")
        if not url:
            from settings import get_settings

            url = get_settings().database_url
        engine = make_engine(url)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # batch rebuilds drop tables: that must not cascade (set outside a transaction)
            _sqlite_pragma(connection, "PRAGMA foreign_keys=OFF")
        try:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if sqlite:
                _sqlite_pragma(connection, "PRAGMA foreign_keys=ON")


def _sqlite_pragma(connection: Any, pragma: str) -> None:
    """Run a PRAGMA on the raw SQLite connection, outside any transaction (else a no-op)."""
    connection.connection.driver_connection.execute(pragma)


if context.is_offline_mode():
    raise SystemExit("diffbank migrations run online only: `diffbank db upgrade`")
run_migrations_online()
