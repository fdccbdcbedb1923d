"""change epochs: one counter every key revocation and served-version change bumps

API processes cache key -> principal and task -> served version; each re-reads this row at
most every `registry_cache_check_s` and drops its entries when the epoch moved, so a change
made through any process (or worker) takes effect everywhere within that bound.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this migration."""
    table = op.create_table(
        "change_epochs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_epochs")),
        sqlite_autoincrement=True,
    )
    op.bulk_insert(table, [{"id": 1, "epoch": 0}])


def downgrade() -> None:
    """Revert this migration."""
    op.drop_table("change_epochs")
