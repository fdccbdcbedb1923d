"""ids are never reused: SQLite tables become AUTOINCREMENT

Without AUTOINCREMENT SQLite hands out the largest rowid + 1, so deleting the newest row
(a dataset, a job, a key...) gives its id to the next insert, possibly another tenant's.
SQLite cannot alter that in place: each table is rebuilt with its rows, indexes and
constraints (env.py turns foreign keys off meanwhile, so the rebuild cascades nothing).
PostgreSQL sequences never go back: nothing to do there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "artifacts",
    "base_models",
    "tenants",
    "api_keys",
    "datasets",
    "tasks",
    "jobs",
    "job_events",
    "consolidation_runs",
    "task_versions",
)


def _rebuild(autoincrement: bool) -> None:
    """Rebuild every registry table on SQLite with or without AUTOINCREMENT."""
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    """Apply this migration."""
    _rebuild(True)


def downgrade() -> None:
    """Revert this migration."""
    _rebuild(False)
