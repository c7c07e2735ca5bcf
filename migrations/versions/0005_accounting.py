"""accounting: records in any order (runs.declared, attempts.start_declared), declared
heartbeat intervals, excluded windows, clashing blocking spans (spans.clashes, charged_s and
span_totals.correction_s) and steps' blocked time as the union of the blocking spans inside
them

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:55:00

Spans that share time with another blocking
span of their rank are flagged and charged by precedence (their span totals corrected), and
the blocked time of the steps they touch is measured again as the union of those spans (it
was their sum), with the step blocks moved by the same amounts. The rollups of runs stored
before 0004 are not made here (migrations import no service code): `goodput db upgrade`
makes them once the schema is at its head (service/store/migrate.py), and `goodput db
rebuild-rollups` on demand.
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
    with op.batch_alter_table("span_totals", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("correction_s", sa.Double(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("spans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clashes", sa.Boolean(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("charged_s", sa.Double(), nullable=True))
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
            'SELECT run_id, rank, attempt, category, start, "end" FROM spans WHERE clashes '
            "ORDER BY run_id, rank, start"
        )
    ).all()
    by_rank: dict[tuple[str, int], list[tuple[int, str, float, float]]] = {}
    for run_id, rank, attempt, category, start, end in clashing:
        by_rank.setdefault((run_id, rank), []).append((attempt, category, start, end))
    for (run_id, rank), spans in by_rank.items():
        _charge(conn, run_id, rank, spans)
        lo, hi = min(s[2] for s in spans), max(s[3] for s in spans)
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


# Frozen copy of the precedence at this revision (service/goodput.py PRECEDENCE).
PRECEDENCE = (
    "checkpoint_restore",
    "checkpoint_save",
    "startup",
    "compile",
    "eval",
    "data_stall",
    "profiling",
    "observability",
)


def _precedence(category: str) -> tuple[int, str]:
    return (PRECEDENCE.index(category), "") if category in PRECEDENCE else (99, category)


def _charge(
    conn: sa.Connection, run_id: str, rank: int, spans: list[tuple[int, str, float, float]]
) -> None:
    """Each second a rank's clashing spans cover goes to the span of highest precedence (the
    earliest among spans of that category): their charged_s, and their span totals moved by
    charged minus summed seconds."""
    events = sorted(
        [(s[2], 1, j) for j, s in enumerate(spans)] + [(s[3], -1, j) for j, s in enumerate(spans)]
    )
    credit = [0.0] * len(spans)
    live: set[int] = set()
    prev = None
    for t, delta, j in events:
        if live and prev is not None and t > prev:
            top = min(live, key=lambda k: (_precedence(spans[k][1]), spans[k][2], spans[k][:2]))
            credit[top] += t - prev
        if delta > 0:
            live.add(j)
        else:
            live.discard(j)
        prev = t
    moves: dict[tuple[int, str], float] = {}
    for (attempt, category, start, end), c in zip(spans, credit, strict=True):
        conn.execute(
            sa.text(
                "UPDATE spans SET charged_s = :c WHERE run_id = :r AND attempt = :a AND rank = :k "
                "AND category = :cat AND start = :s"
            ),
            {"c": c, "r": run_id, "a": attempt, "k": rank, "cat": category, "s": start},
        )
        moves[attempt, category] = moves.get((attempt, category), 0.0) + c - (end - start)
    for (attempt, category), d in moves.items():
        conn.execute(
            sa.text(
                "UPDATE span_totals SET correction_s = correction_s + :d WHERE run_id = :r "
                "AND rank = :k AND attempt = :a AND category = :cat AND NOT overlapped"
            ),
            {"d": d, "r": run_id, "k": rank, "a": attempt, "cat": category},
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
        ("spans", "charged_s"),
        ("span_totals", "correction_s"),
        ("spans", "clashes"),
        ("attempts", "heartbeat_s"),
        ("attempts", "start_declared"),
        ("runs", "declared"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    op.drop_table("excluded_windows")
