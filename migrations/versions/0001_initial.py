"""initial schema: runs, attempts, steps, spans

Revision ID: 0001
Revises:
Create Date: 2026-11-22 18:07:40.551344
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# The category list is frozen here as it was at this revision; a later revision that adds
# categories replaces the CHECK constraint.

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("model_plan", sa.JSON(), nullable=False),
        sa.Column("runtime_policy", sa.JSON(), nullable=False),
        sa.Column("environment", sa.JSON(), nullable=False),
        sa.Column("ingested_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index("ix_runs_created_at_run_id", ["created_at", "run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_project"), ["project"], unique=False)

    op.create_table(
        "attempts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("world_size", sa.Integer(), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("end", sa.Double(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("cause", sa.Text(), nullable=True),
        sa.Column("hook_errors", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "status IS NULL OR status IN ('completed', 'failed')", name=op.f("ck_attempts_status")
        ),
        sa.CheckConstraint(
            '"end" IS NULL OR "end" >= start', name=op.f("ck_attempts_end_after_start")
        ),
        sa.CheckConstraint(
            "attempt >= 0 AND rank >= 0 AND world_size >= 1", name=op.f("ck_attempts_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_attempts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
        sa.UniqueConstraint(
            "run_id", "attempt", "rank", name=op.f("uq_attempts_run_id_attempt_rank")
        ),
    )
    op.create_table(
        "spans",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=80), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("end", sa.Double(), nullable=False),
        sa.Column("overlapped", sa.Boolean(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "category IN ('startup', 'compile', 'data_stall', 'checkpoint_save', "
            "'checkpoint_restore', 'eval', 'wasted_progress', 'infra_recovery', "
            "'observability', 'profiling') OR category LIKE 'custom:%'",
            name=op.f("ck_spans_known_category"),
        ),
        sa.CheckConstraint('"end" >= start', name=op.f("ck_spans_end_after_start")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_spans_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spans")),
        sa.UniqueConstraint(
            "run_id",
            "attempt",
            "rank",
            "category",
            "start",
            name=op.f("uq_spans_run_id_attempt_rank_category_start"),
        ),
    )
    op.create_table(
        "steps",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("end", sa.Double(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.CheckConstraint('"end" >= start', name=op.f("ck_steps_end_after_start")),
        sa.CheckConstraint("tokens >= 0 AND step >= 0", name=op.f("ck_steps_non_negative")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_steps_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steps")),
        sa.UniqueConstraint(
            "run_id", "attempt", "rank", "step", name=op.f("uq_steps_run_id_attempt_rank_step")
        ),
    )


def downgrade() -> None:
    op.drop_table("steps")
    op.drop_table("spans")
    op.drop_table("attempts")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_project"))
        batch_op.drop_index(batch_op.f("ix_runs_name"))
        batch_op.drop_index("ix_runs_created_at_run_id")

    op.drop_table("runs")
