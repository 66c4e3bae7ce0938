"""Which serving process owns each pending exchange, so that a restart finds what a process
that is gone accepted and never finished.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Columns added in place: rebuilding exchanges on SQLite would run the ON DELETE actions
    # of every table that refers to it. Rows pending from before keep NULL owners: nothing
    # owns them, so the next start answers them.
    with op.batch_alter_table("exchanges", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("owner_token", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("owned_since", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_exchanges_pending",
        "exchanges",
        ["status"],
        unique=False,
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_exchanges_pending", table_name="exchanges")
    with op.batch_alter_table("exchanges", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("owned_since")
        batch_op.drop_column("owner_token")
        batch_op.drop_column("pid")
        batch_op.drop_column("host")
