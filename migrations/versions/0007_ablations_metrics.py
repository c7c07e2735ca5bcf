"""ablations (declared knob grids), runs.ablation_id/ablation_cell (a run's place in one), and
metrics (values measured at a step besides the training loss: eval_loss)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 11:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("ablation_id", sa.String(length=128), nullable=True))
    op.add_column("runs", sa.Column("ablation_cell", sa.String(length=200), nullable=True))
    op.create_index(op.f("ix_runs_ablation_id"), "runs", ["ablation_id"], unique=False)
    op.create_table(
        "ablations",
        sa.Column("ablation_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("knobs", sa.JSON(), nullable=False),
        sa.Column("cells", sa.JSON(), nullable=False),
        sa.Column("baseline_cell", sa.String(length=200), nullable=False),
        sa.Column("repeats", sa.Integer(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("ablation_id", name=op.f("pk_ablations")),
    )
    op.create_index(op.f("ix_ablations_project"), "ablations", ["project"], unique=False)
    op.create_table(
        "metrics",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("time", sa.Double(), nullable=False),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name=op.f("fk_metrics_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
        sa.UniqueConstraint(
            "run_id",
            "attempt",
            "rank",
            "name",
            "step",
            name=op.f("uq_metrics_run_id_attempt_rank_name_step"),
        ),
    )


def downgrade() -> None:
    op.drop_table("metrics")
    op.drop_index(op.f("ix_ablations_project"), table_name="ablations")
    op.drop_table("ablations")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): batch mode would copy `runs`, and
    # dropping the old copy cascades to every child row on SQLite.
    op.drop_index(op.f("ix_runs_ablation_id"), table_name="runs")
    for column in ("ablation_cell", "ablation_id"):
        op.execute(f"ALTER TABLE runs DROP COLUMN {column}")
