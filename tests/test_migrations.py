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


# Rows of the tables whose ids users see; each refers to parents with id 1 (see _parents).
ID_ROWS = {
    "tenants": lambda n: {"name": f"tenant-{n}"},
    "artifacts": lambda n: {"object_key": f"k{n}", "sha256": "s", "size_bytes": 1, "kind": "diff"},
    "api_keys": lambda n: {"tenant_id": 1, "prefix": f"p{n}", "key_hash": "h", "scopes": []},
    "datasets": lambda n: {
        "tenant_id": 1,
        "filename": "f.jsonl",
        "format": "jsonl",
        "sha256": "s",
        "size_bytes": 1,
        "artifact_id": 1,
        "rows": 2,
        "label_names": ["a", "b"],
        "task_type": "classification",
        "column_mapping": {},
    },
    "tasks": lambda n: {
        "tenant_id": 1,
        "name": f"task-{n}",
        "base_model_id": 1,
        "task_type": "classification",
        "label_names": ["a", "b"],
    },
    "jobs": lambda n: {"tenant_id": 1, "kind": "train", "base_model": "b", "params": {}},
    "job_events": lambda n: {"job_id": 1, "seq": n, "kind": "state", "payload": {}},
    "task_versions": lambda n: {
        "task_id": 1,
        "number": n,
        "metrics": {},
        "config": {},
        "nnz": 1,
        "density": 0.1,
        "artifact_id": 1,
    },
}
PARENTS = ("tenants", "artifacts", "tasks", "jobs")


def _insert(conn, table: str, n: int) -> int:
    values = ID_ROWS[table](n)
    if table == "tasks":
        base = Base.metadata.tables["base_models"]
        if conn.execute(base.select()).first() is None:
            conn.execute(base.insert().values(name="b", source="b", fingerprint="f", n_params=1))
    return conn.execute(Base.metadata.tables[table].insert().values(**values)).inserted_primary_key[
        0
    ]


@pytest.mark.parametrize("table", sorted(ID_ROWS))
def test_the_id_of_a_deleted_newest_row_is_never_handed_out_again(empty_engine, table):
    upgrade(empty_engine)
    rows = Base.metadata.tables[table]
    with empty_engine.begin() as conn:
        for parent in PARENTS:
            assert _insert(conn, parent, 0) == 1
        newest = max(_insert(conn, table, 1), _insert(conn, table, 2))
        conn.execute(rows.delete().where(rows.c.id == newest))
    with empty_engine.begin() as conn:
        assert _insert(conn, table, 3) > newest


def test_every_sqlite_table_is_autoincrement_after_upgrade(tmp_path):
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'ids.db'}")
    upgrade(engine)
    with engine.connect() as conn:
        query = text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
        sql = dict(conn.execute(query).tuples().all())
    engine.dispose()
    for table in REGISTRY_TABLES:  # a later batch migration must keep AUTOINCREMENT
        assert "AUTOINCREMENT" in sql[table], table
        assert Base.metadata.tables[table].dialect_options["sqlite"]["autoincrement"], table


def test_upgrade_to_autoincrement_keeps_rows_and_references(tmp_path):
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0001")
    with engine.begin() as conn:
        for parent in PARENTS:
            _insert(conn, parent, 0)
        _insert(conn, "datasets", 1)
        conn.execute(text("UPDATE jobs SET dataset_id = 1"))
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT dataset_id FROM jobs")).all() == [(1,)]
        assert conn.execute(text("SELECT count(*) FROM tasks")).scalar() == 1
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    check_schema_current(engine)
    engine.dispose()
