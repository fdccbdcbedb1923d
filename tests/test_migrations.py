"""Alembic migrations: one head, upgrade from empty, models == migrations, down and up again,
and the startup check that names the command to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from registry.db import (
    SchemaNotCurrentError,
    alembic_config,
    check_schema_current,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from registry.models import Base

REPO_ROOT = Path(__file__).resolve().parents[1]
REGISTRY_TABLES = {table.name for table in Base.metadata.sorted_tables}


@pytest.fixture
def empty_engine(empty_db_url):
    engine = make_engine(empty_db_url)
    yield engine
    engine.dispose()


def schema_diff(engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_migrations_have_a_single_head():
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert heads == [head_revision()]


def test_empty_database_is_refused_with_the_command_to_run(empty_engine):
    with pytest.raises(SchemaNotCurrentError) as err:
        check_schema_current(empty_engine)
    message = str(err.value)
    assert "run `diffbank db upgrade`" in message
    assert "empty" in message and head_revision() in message


def test_upgrade_from_empty_creates_every_table_and_passes_the_check(empty_engine):
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()
    assert REGISTRY_TABLES <= set(inspect(empty_engine).get_table_names())
    check_schema_current(empty_engine)


def test_models_and_migrations_agree(empty_engine):
    upgrade(empty_engine)
    assert schema_diff(empty_engine) == []


def test_downgrade_to_base_then_upgrade_again(empty_engine):
    upgrade(empty_engine)
    downgrade(empty_engine, "base")
    assert set(inspect(empty_engine).get_table_names()) & REGISTRY_TABLES == set()
    with pytest.raises(SchemaNotCurrentError, match="diffbank db upgrade"):
        check_schema_current(empty_engine)
    upgrade(empty_engine)
    check_schema_current(empty_engine)
    assert schema_diff(empty_engine) == []


def test_db_upgrade_command_works_from_any_directory(tmp_path):
    database = tmp_path / "cli.db"
    env = {
        **os.environ,
        "DIFFBANK_DATA_DIR": str(tmp_path / "data"),
        "DIFFBANK_DATABASE_URL": f"sqlite:///{database}",
        "PYTHONPATH": str(REPO_ROOT),
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "cli", "db", "upgrade"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert head_revision() in done.stdout
    engine = make_engine(f"sqlite:///{database}")
    check_schema_current(engine)
    engine.dispose()


def test_database_newer_than_the_code_says_so(empty_engine):
    from sqlalchemy import text

    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    with pytest.raises(SchemaNotCurrentError, match="newer than this code"):
        check_schema_current(empty_engine)
