"""step_blocks.dev_*: per block, how many steps have a device time and the lowest and highest
of them with their steps, so that a device-time series downsamples from the blocks as the loss
series does (the hooks time one step in `device_every`, so most steps have none); filled from
the steps already stored

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("dev_n", "dev_low", "dev_low_step", "dev_high", "dev_high_step")


def upgrade() -> None:
    op.add_column(
        "step_blocks", sa.Column("dev_n", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column("step_blocks", sa.Column("dev_low", sa.Double(), nullable=True))
    op.add_column("step_blocks", sa.Column("dev_low_step", sa.BigInteger(), nullable=True))
    op.add_column("step_blocks", sa.Column("dev_high", sa.Double(), nullable=True))
    op.add_column("step_blocks", sa.Column("dev_high_step", sa.BigInteger(), nullable=True))
    # A block's steps: those of its run, rank and attempt numbered [block * level, (block +
    # 1) * level) that have a device time. Ties go to the lower step, as at ingest
    # (service/store/rollups/write.py, lower_first and higher_first).
    steps = (
        "FROM steps s WHERE s.run_id = step_blocks.run_id AND s.rank = step_blocks.rank "
        "AND s.attempt = step_blocks.attempt AND s.step >= step_blocks.block * step_blocks.level "
        "AND s.step < (step_blocks.block + 1) * step_blocks.level "
        "AND s.device_time_s IS NOT NULL"
    )
    low = f"{steps} ORDER BY s.device_time_s, s.step LIMIT 1"
    high = f"{steps} ORDER BY s.device_time_s DESC, s.step LIMIT 1"
    op.execute(
        f"UPDATE step_blocks SET dev_n = (SELECT count(*) {steps}), "
        f"dev_low = (SELECT s.device_time_s {low}), dev_low_step = (SELECT s.step {low}), "
        f"dev_high = (SELECT s.device_time_s {high}), dev_high_step = (SELECT s.step {high}) "
        f"WHERE EXISTS (SELECT 1 {steps})"
    )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), as 0007 does: no copy of the table.
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE step_blocks DROP COLUMN {column}")
