"""accounting: records in any order (runs.declared, attempts.start_declared), declared
heartbeat intervals, excluded windows, clashing blocking spans (spans.clashes) and steps'
blocked time as the union of the blocking spans inside them

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:55:00

Self-contained: it imports nothing of `service`. Spans that share time with another blocking
span of their rank are flagged, and the blocked time of the steps they touch is measured
again as the union of those spans (it was their sum), with the step blocks moved by the same
amounts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEVELS = (64, 4096)  # frozen copy of the rollup levels at this revision


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("declared", sa.Boolean(), server_default="1", nullable=False))
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("start_declared", sa.Boolean(), server_default="1", nullable=False)
        )
        batch_op.add_column(sa.Column("heartbeat_s", sa.Double(), nullable=True))
    op.create_table(
        "excluded_windows",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("start", sa.Double(), nullable=False),
        sa.Column("end", sa.Double(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.CheckConstraint('"end" > start', name=op.f("ck_excluded_windows_end_after_start")),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name=op.f("fk_excluded_windows_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "start", "end", name=op.f("pk_excluded_windows")),
    )
    with op.batch_alter_table("spans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clashes", sa.Boolean(), server_default="0", nullable=False))
        batch_op.create_index(
            "ix_spans_clashes",
            ["run_id", "rank", "start"],
            unique=False,
            sqlite_where=sa.text("clashes"),
            postgresql_where=sa.text("clashes"),
        )
    _flag_clashes()


def _flag_clashes() -> None:
    conn = op.get_bind()
    conn.execute(
        sa.text(
            """
            UPDATE spans SET clashes = true
            WHERE NOT overlapped AND EXISTS (
              SELECT 1 FROM spans o
              WHERE o.run_id = spans.run_id AND o.rank = spans.rank AND NOT o.overlapped
                AND o.start < spans."end" AND o."end" > spans.start
                AND NOT (o.attempt = spans.attempt AND o.category = spans.category
                         AND o.start = spans.start))
            """
        )
    )
    clashing = conn.execute(
        sa.text(
            'SELECT run_id, rank, start, "end" FROM spans WHERE clashes '
            "ORDER BY run_id, rank, start"
        )
    ).all()
    by_rank: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for run_id, rank, start, end in clashing:
        by_rank.setdefault((run_id, rank), []).append((start, end))
    for (run_id, rank), spans in by_rank.items():
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        steps = conn.execute(
            sa.text(
                'SELECT attempt, step, start, "end", blocked_s FROM steps WHERE run_id = :r '
                'AND rank = :k AND start < :hi AND "end" > :lo'
            ),
            {"r": run_id, "k": rank, "lo": lo, "hi": hi},
        ).all()
        for attempt, step, start, end, old in steps:
            blocking = conn.execute(
                sa.text(
                    'SELECT start, "end" FROM spans WHERE run_id = :r AND rank = :k '
                    'AND NOT overlapped AND start < :e AND "end" > :s'
                ),
                {"r": run_id, "k": rank, "s": start, "e": end},
            ).all()
            new = _union_inside(start, end, [(a, b) for a, b in blocking])
            if new == old:
                continue
            conn.execute(
                sa.text(
                    "UPDATE steps SET blocked_s = :b WHERE run_id = :r AND attempt = :a "
                    "AND rank = :k AND step = :n"
                ),
                {"b": new, "r": run_id, "a": attempt, "k": rank, "n": step},
            )
            for level in LEVELS:
                conn.execute(
                    sa.text(
                        "UPDATE step_blocks SET blocked_s = blocked_s + :d WHERE run_id = :r "
                        "AND rank = :k AND level = :l AND block = :b AND attempt = :a"
                    ),
                    {
                        "d": new - old,
                        "r": run_id,
                        "k": rank,
                        "l": level,
                        "b": step // level,
                        "a": attempt,
                    },
                )


def _union_inside(start: float, end: float, spans: list[tuple[float, float]]) -> float:
    """Seconds of [start, end] covered by at least one of the spans."""
    total, reach = 0.0, start
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): batch mode would copy `runs`, and
    # dropping the old copy cascades to every child row on SQLite.
    op.drop_index("ix_spans_clashes", table_name="spans")
    for table, column in (
        ("spans", "clashes"),
        ("attempts", "heartbeat_s"),
        ("attempts", "start_declared"),
        ("runs", "declared"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    op.drop_table("excluded_windows")
