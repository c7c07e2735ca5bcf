"""checkpoints, routing, observations, profiles, heartbeats, step metrics

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 18:26:59.040634
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("time", sa.Double(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
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
            ["run_id"], ["runs.run_id"], name=op.f("fk_checkpoints_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint(
            "run_id",
            "attempt",
            "rank",
            "step",
            name=op.f("uq_checkpoints_run_id_attempt_rank_step"),
        ),
    )
    op.create_table(
        "observations",
        sa.Column("seam", sa.String(length=200), nullable=False),
        sa.Column("requested", sa.String(length=200), nullable=True),
        sa.Column("observed", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("time", sa.Double(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=True),
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
            name=op.f("fk_observations_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observations")),
        sa.UniqueConstraint(
            "run_id",
            "attempt",
            "rank",
            "seam",
            "observed",
            name=op.f("uq_observations_run_id_attempt_rank_seam_observed"),
        ),
    )
    op.create_table(
        "profiles",
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("num_steps", sa.Integer(), nullable=False),
        sa.Column("trace_path", sa.Text(), nullable=True),
        sa.Column("top_kernels", sa.JSON(), nullable=False),
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
            ["run_id"], ["runs.run_id"], name=op.f("fk_profiles_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profiles")),
        sa.UniqueConstraint(
            "run_id",
            "attempt",
            "rank",
            "first_step",
            name=op.f("uq_profiles_run_id_attempt_rank_first_step"),
        ),
    )
    op.create_table(
        "routing",
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("num_steps", sa.Integer(), nullable=False),
        sa.Column("num_tokens", sa.BigInteger(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("null_slot", sa.Boolean(), nullable=False),
        sa.Column("tokens_per_expert", sa.JSON(), nullable=False),
        sa.Column("dropped_per_expert", sa.JSON(), nullable=False),
        sa.Column("capacity", sa.BigInteger(), nullable=True),
        sa.Column("shared_only_tokens", sa.BigInteger(), nullable=True),
        sa.Column("aux_loss", sa.Double(), nullable=True),
        sa.Column("z_loss", sa.Double(), nullable=True),
        sa.Column("max_vio", sa.Double(), nullable=True),
        sa.Column("drop_rate", sa.Double(), nullable=True),
        sa.Column("null_fraction", sa.Double(), nullable=True),
        sa.Column("shared_only_fraction", sa.Double(), nullable=True),
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "drop_rate IS NULL OR (drop_rate >= 0 AND drop_rate <= 1)",
            name=op.f("ck_routing_drop_rate_fraction"),
        ),
        sa.CheckConstraint(
            "null_fraction IS NULL OR (null_fraction >= 0 AND null_fraction <= 1)",
            name=op.f("ck_routing_null_fraction_fraction"),
        ),
        sa.CheckConstraint(
            "shared_only_fraction IS NULL OR "
            "(shared_only_fraction >= 0 AND shared_only_fraction <= 1)",
            name=op.f("ck_routing_shared_only_fraction_fraction"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_routing_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing")),
        sa.UniqueConstraint(
            "run_id",
            "attempt",
            "rank",
            "step",
            "layer",
            name=op.f("uq_routing_run_id_attempt_rank_step_layer"),
        ),
    )
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_seen", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("counters", sa.JSON(), nullable=True))

    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device_time_s", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("hook_overhead_s", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("flops", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("mem_allocated_peak", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("mem_reserved_peak", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("alloc_retries", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("alloc_retries")
        batch_op.drop_column("mem_reserved_peak")
        batch_op.drop_column("mem_allocated_peak")
        batch_op.drop_column("flops")
        batch_op.drop_column("hook_overhead_s")
        batch_op.drop_column("device_time_s")

    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("counters")
        batch_op.drop_column("last_seen")

    op.drop_table("routing")
    op.drop_table("profiles")
    op.drop_table("observations")
    op.drop_table("checkpoints")
