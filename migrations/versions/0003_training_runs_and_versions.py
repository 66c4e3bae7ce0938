"""Training runs with a stage machine (one at a time), versions that know how they are served,
and the activation history rollbacks walk back through.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STAGES = (
    "queued",
    "exporting",
    "training",
    "converting",
    "evaluating",
    "promoting",
    "done",
    "rejected",
    "failed",
    "cancelled",
)
RUNNING_STAGES = STAGES[:6]
OLD_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def upgrade() -> None:
    op.create_table(
        "model_activations",
        sa.Column("id", ID, nullable=False),
        sa.Column("model_version_id", ID, nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("rolled_back", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_activations_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_activations")),
    )
    with op.batch_alter_table("model_activations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_activations_model_version_id"), ["model_version_id"], unique=False
        )
    # Columns added in place: rebuilding model_versions on SQLite would run the ON DELETE
    # actions of every table that refers to it.
    with op.batch_alter_table("model_versions", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("trainer", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("run_id", ID, nullable=True))
        batch_op.add_column(sa.Column("system_prompt", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("template", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))
    # The version active now is where the history starts.
    op.execute(
        "INSERT INTO model_activations (model_version_id, reason, rolled_back, activated_at) "
        "SELECT id, 'activate', false, COALESCE(activated_at, created_at) "
        "FROM model_versions WHERE is_active"
    )

    # New columns that must not be NULL are filled from the old ones before they are required.
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stage", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("is_running", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("trainer", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("force", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("dry_run", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("report_platform", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("report_chat_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("report_message_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("progress", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("trainer_pgid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("run_dir", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("log_path", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("notes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("decision", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("base_version_id", ID, nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))

    # Runs of the old schema had no supervisor: an unfinished one can never finish now.
    op.execute(
        "UPDATE training_runs SET error = 'never run: training came with schema 0003' "
        "WHERE status IN ('queued', 'running') AND error IS NULL"
    )
    op.execute(
        "UPDATE training_runs SET "
        "stage = CASE status WHEN 'succeeded' THEN 'done' WHEN 'cancelled' THEN 'cancelled' "
        "ELSE 'failed' END, "
        "is_running = false, progress = '{}', notes = '[]', "
        "updated_at = COALESCE(finished_at, started_at, created_at), "
        "output_path = COALESCE(output_path, dataset_path)"
    )

    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_runs_status"))
        batch_op.drop_constraint(batch_op.f("ck_training_runs_training_status"), type_="check")
        batch_op.drop_column("status")
        batch_op.drop_column("metrics")
        batch_op.drop_column("worker")
        batch_op.drop_column("dataset_path")
        for name in ("stage", "is_running", "progress", "notes", "updated_at"):
            batch_op.alter_column(name, nullable=False)
        batch_op.create_check_constraint(
            batch_op.f("ck_training_runs_run_stage"), f"stage IN ({_in(STAGES)})"
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_training_runs_running_matches_stage"),
            f"is_running = (stage IN ({_in(RUNNING_STAGES)}))",
        )
        batch_op.create_index(batch_op.f("ix_training_runs_stage"), ["stage"], unique=False)
        batch_op.create_index(
            "uq_training_runs_one_running",
            ["is_running"],
            unique=True,
            sqlite_where=sa.text("is_running"),
            postgresql_where=sa.text("is_running"),
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_training_runs_base_version_id_model_versions"),
            "model_versions",
            ["base_version_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("metrics", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("worker", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("dataset_path", sa.Text(), nullable=True))
    op.execute(
        "UPDATE training_runs SET "
        "status = CASE stage WHEN 'done' THEN 'succeeded' WHEN 'rejected' THEN 'failed' "
        "WHEN 'failed' THEN 'failed' WHEN 'cancelled' THEN 'cancelled' ELSE 'running' END, "
        "metrics = COALESCE(evaluation, '{}'), worker = host"
    )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_training_runs_base_version_id_model_versions"), type_="foreignkey"
        )
        batch_op.drop_index(
            "uq_training_runs_one_running",
            sqlite_where=sa.text("is_running"),
            postgresql_where=sa.text("is_running"),
        )
        batch_op.drop_index(batch_op.f("ix_training_runs_stage"))
        batch_op.drop_constraint(
            batch_op.f("ck_training_runs_running_matches_stage"), type_="check"
        )
        batch_op.drop_constraint(batch_op.f("ck_training_runs_run_stage"), type_="check")
        for name in (
            "updated_at",
            "base_version_id",
            "decision",
            "evaluation",
            "notes",
            "log_path",
            "run_dir",
            "trainer_pgid",
            "pid",
            "host",
            "progress",
            "report_message_id",
            "report_chat_id",
            "report_platform",
            "dry_run",
            "force",
            "trainer",
            "is_running",
            "stage",
        ):
            batch_op.drop_column(name)
        batch_op.alter_column("status", nullable=False)
        batch_op.alter_column("metrics", nullable=False)
        batch_op.create_check_constraint(
            batch_op.f("ck_training_runs_training_status"), f"status IN ({_in(OLD_STATUSES)})"
        )
        batch_op.create_index(batch_op.f("ix_training_runs_status"), ["status"], unique=False)

    op.drop_table("model_activations")
    with op.batch_alter_table("model_versions", schema=None, recreate="never") as batch_op:
        for name in ("evaluation", "template", "system_prompt", "run_id", "trainer"):
            batch_op.drop_column(name)
