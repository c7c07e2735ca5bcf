"""rollups for many windows at once: span_buckets, per (run, rank, attempt, category, bucket
of 16 s of start time) the count, seconds, first start and last end of the blocking spans;
step_micro_blocks, per (run, rank, attempt, block of 8 step numbers) the sums of the steps;
both filled from the rows already stored

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# service.store.models.SPAN_BUCKET_S and MICRO_BLOCK (migrations import no service code; a
# test checks that they agree).
SPAN_BUCKET_S = 16.0
MICRO_BLOCK = 8


def upgrade() -> None:
    op.create_table(
        "span_buckets",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=80), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("total_s", sa.Double(), nullable=False),
        sa.Column("first_start", sa.Double(), nullable=False),
        sa.Column("last_end", sa.Double(), nullable=False),
        sa.CheckConstraint("n >= 1 AND total_s >= 0", name=op.f("ck_span_buckets_non_negative")),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name=op.f("fk_span_buckets_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "rank", "attempt", "category", "bucket", name=op.f("pk_span_buckets")
        ),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "step_micro_blocks",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("micro", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("busy_s", sa.Double(), nullable=False),
        sa.Column("blocked_s", sa.Double(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("hook_s", sa.Double(), nullable=False),
        sa.Column("first_start", sa.Double(), nullable=False),
        sa.Column("last_end", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "n >= 1 AND busy_s >= 0 AND blocked_s >= 0",
            name=op.f("ck_step_micro_blocks_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name=op.f("fk_step_micro_blocks_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "rank", "attempt", "micro", name=op.f("pk_step_micro_blocks")
        ),
        sqlite_with_rowid=False,
    )
    # Steps are numbered from 0 (a check on steps), so integer division is their floor.
    op.execute(
        "INSERT INTO step_micro_blocks (run_id, rank, attempt, micro, n, busy_s, blocked_s, "
        "tokens, hook_s, first_start, last_end) "
        f'SELECT run_id, rank, attempt, step / {MICRO_BLOCK}, count(*), sum("end" - start), '
        "sum(blocked_s), sum(tokens), sum(coalesce(hook_overhead_s, 0.0)), min(start), "
        f'max("end") FROM steps GROUP BY run_id, rank, attempt, step / {MICRO_BLOCK}'
    )
    # floor(start / SPAN_BUCKET_S): SQLite has no floor() in every build; the division by a
    # power of two is exact, so its floor is the same here as in Python.
    if op.get_bind().dialect.name == "postgresql":
        bucket = f"CAST(floor(start / {SPAN_BUCKET_S}) AS BIGINT)"
    else:
        q = f"(start / {SPAN_BUCKET_S})"
        whole = f"CAST({q} AS INTEGER)"
        bucket = f"({whole} - (CASE WHEN {q} < {whole} THEN 1 ELSE 0 END))"
    op.execute(
        "INSERT INTO span_buckets "
        "(run_id, rank, attempt, category, bucket, n, total_s, first_start, last_end) "
        f'SELECT run_id, rank, attempt, category, {bucket}, count(*), sum("end" - start), '
        'min(start), max("end") FROM spans WHERE NOT overlapped '
        f"GROUP BY run_id, rank, attempt, category, {bucket}"
    )


def downgrade() -> None:
    op.drop_table("step_micro_blocks")
    op.drop_table("span_buckets")
