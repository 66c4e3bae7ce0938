"""Correction prompts: which answer a reply to a ✏️ prompt corrects, kept across restarts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "correction_prompts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("chat_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column(
            "exchange_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exchange_id"],
            ["exchanges.id"],
            name=op.f("fk_correction_prompts_exchange_id_exchanges"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_correction_prompts_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_correction_prompts")),
        sa.UniqueConstraint(
            "platform",
            "chat_id",
            "message_id",
            name=op.f("uq_correction_prompts_platform_chat_id_message_id"),
        ),
    )
    with op.batch_alter_table("correction_prompts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_correction_prompts_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_correction_prompts_exchange_id"), ["exchange_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_correction_prompts_user_id"), ["user_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("correction_prompts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_correction_prompts_user_id"))
        batch_op.drop_index(batch_op.f("ix_correction_prompts_exchange_id"))
        batch_op.drop_index(batch_op.f("ix_correction_prompts_created_at"))

    op.drop_table("correction_prompts")
