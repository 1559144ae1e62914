"""Metric series for charts: a job's keys, its downsampled series, and points past a cursor.

A job can log a million `step_loss` points. Reading them all to keep 2,000 takes
seconds, so nothing here scans a series: the keys come from a skip scan of the
(job_id, key, step) index, a long series is sampled with one index seek per evenly
spaced step, and live updates read only the points past the step a client already has.
The reads are plain SQL that SQLite and PostgreSQL plan the same way (index seeks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text, union_all
from sqlalchemy.orm import Session

from shared.metric_catalog import finite_number
from shared.orm import MetricPoint

# (step, epoch, value), the columns a chart needs.
Point = tuple[int, int | None, float]

DEFAULT_MAX_POINTS = 2000
# A job logs a handful of keys; this only bounds a skip scan over a strange job.
MAX_KEYS = 200
# A series whose step range is at most max_points wide is read whole, up to this many
# times max_points rows (points repeated at one step by a resumed attempt), then thinned.
_DENSE_READ_FACTOR = 20

# Each step of the recursion seeks the next larger key: O(keys * log n), not O(n).
_KEYS_SQL = text(
    """
    WITH RECURSIVE k(key) AS (
        SELECT MIN(key) FROM metric_points WHERE job_id = :job_id
        UNION ALL
        SELECT (SELECT MIN(m.key) FROM metric_points m WHERE m.job_id = :job_id AND m.key > k.key)
        FROM k WHERE k.key IS NOT NULL
    )
    SELECT key FROM k WHERE key IS NOT NULL LIMIT :max_keys
    """
)

# One index seek per target step: the first point at or after lo, lo + width, lo + 2 width,
# ... (strictly below hi; the caller adds the last point itself). PostgreSQL runs the
# seek as a LATERAL subquery; SQLite has no LATERAL, so it seeks the row id in a
# correlated subquery and joins on it. PostgreSQL orders by step alone: a tie-break on
# id costs it a sort per seek (twice the time), and ties only come from a resumed
# attempt logging the same step again, with the same value.
_TARGETS = """
    WITH RECURSIVE t(s) AS (
        SELECT CAST(:lo AS BIGINT)
        UNION ALL
        SELECT s + :width FROM t WHERE s + :width < :hi
    )
"""
_SAMPLE_SQL = {
    "postgresql": text(
        _TARGETS
        + """
    SELECT p.step, p.epoch, p.value FROM t CROSS JOIN LATERAL (
        SELECT m.step, m.epoch, m.value FROM metric_points m
        WHERE m.job_id = :job_id AND m.key = :key AND m.step >= t.s
        ORDER BY m.step
        LIMIT 1
    ) p
    """
    ),
    "sqlite": text(
        _TARGETS
        + """
    SELECT p.step, p.epoch, p.value FROM t JOIN metric_points p ON p.id = (
        SELECT m.id FROM metric_points m
        WHERE m.job_id = :job_id AND m.key = :key AND m.step >= t.s
        ORDER BY m.step, m.id
        LIMIT 1
    )
    """
    ),
}


@dataclass
class Series:
    """One key's points, columnar, oldest step first."""

    step: list[int] = field(default_factory=list)
    epoch: list[int | None] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, points: Iterable[Point]) -> Series:
        series = cls()
        for step, epoch, value in points:
            series.step.append(step)
            series.epoch.append(epoch)
            series.value.append(value)
        return series

    @property
    def last_step(self) -> int | None:
        return self.step[-1] if self.step else None

    def __len__(self) -> int:
        return len(self.step)

    def to_json(self) -> dict[str, Any]:
        # A diverged run stores NaN and infinity as they were; JSON has neither, so they
        # go out as null (the live stream does the same).
        values = [finite_number(v) for v in self.value]
        return {"step": self.step, "epoch": self.epoch, "value": values}


def downsample(rows: list[Point], max_points: int) -> list[Point]:
    """At most `max_points` of `rows` by an even stride, always keeping the last one."""
    # Even stride keeps the shape of a curve; the last point is always kept so the
    # final value shown matches the result.
    if len(rows) <= max_points:
        return rows
    stride = -(-len(rows) // max_points)
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked[-1] = rows[-1]
    return picked


def metric_keys(session: Session, job_id: int) -> list[str]:
    """The keys a job has logged, sorted."""
    rows = session.execute(_KEYS_SQL, {"job_id": job_id, "max_keys": MAX_KEYS})
    return [row[0] for row in rows]


def _edge_point(session: Session, job_id: int, key: str, *, last: bool) -> Point | None:
    if last:
        order = (MetricPoint.step.desc(), MetricPoint.id.desc())
    else:
        order = (MetricPoint.step.asc(), MetricPoint.id.asc())
    row = session.execute(
        select(MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
        .where(MetricPoint.job_id == job_id, MetricPoint.key == key)
        .order_by(*order)
        .limit(1)
    ).first()
    return None if row is None else (row[0], row[1], row[2])


def _points_between(
    session: Session, job_id: int, key: str, lo: int, hi: int, limit: int
) -> list[Point]:
    rows = session.execute(
        select(MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
        .where(
            MetricPoint.job_id == job_id,
            MetricPoint.key == key,
            MetricPoint.step >= lo,
            MetricPoint.step <= hi,
        )
        .order_by(MetricPoint.step, MetricPoint.id)
        .limit(limit)
    )
    return [(r[0], r[1], r[2]) for r in rows]


def load_key(session: Session, job_id: int, key: str, max_points: int) -> Series:
    """One key's series with at most `max_points` points (first and last included)."""
    first = _edge_point(session, job_id, key, last=False)
    last = _edge_point(session, job_id, key, last=True)
    if first is None or last is None:
        return Series()
    lo, hi = first[0], last[0]
    if hi - lo < max_points:
        # At most max_points distinct steps: read them (bounded), thin any repeats.
        rows = _points_between(session, job_id, key, lo, hi, max_points * _DENSE_READ_FACTOR)
        if rows[-1][0] != hi:
            rows.append(last)
        return Series.of(downsample(rows, max_points))
    # Targets lo, lo + width, ... below hi: at most max_points - 1 of them, plus the last.
    width = -(-(hi - lo) // (max_points - 1))
    params = {"job_id": job_id, "key": key, "lo": lo, "hi": hi, "width": width}
    dialect = session.get_bind().dialect.name
    sample = _SAMPLE_SQL["postgresql" if dialect == "postgresql" else "sqlite"]
    points: list[Point] = []
    for step, epoch, value in sorted(session.execute(sample, params), key=lambda r: r[0]):
        # Sparse steps let two targets find the same point; the last point comes below.
        if step != hi and (not points or step != points[-1][0]):
            points.append((step, epoch, value))
    points.append(last)
    return Series.of(points)


def load_series(
    session: Session,
    job_id: int,
    keys: Iterable[str] | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> dict[str, Series]:
    """Each key's series (all keys when `keys` is None), downsampled on the server."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    present = metric_keys(session, job_id)
    wanted = present if keys is None else sorted(set(keys) & set(present))
    out = {}
    for key in wanted:
        series = load_key(session, job_id, key, max_points)
        if series:
            out[key] = series
    return out


@dataclass(frozen=True)
class NewPoints:
    """Points past a client's cursor: appended per key, or a whole series to replace
    what the client has (`reset`) when it had none or fell too far behind."""

    appended: dict[str, Series]
    reset: dict[str, Series]

    def __bool__(self) -> bool:
        return bool(self.appended or self.reset)


def points_after(
    session: Session,
    job_id: int,
    after: dict[str, int],
    *,
    limit: int,
    max_points: int = DEFAULT_MAX_POINTS,
) -> NewPoints:
    """For each key of the job: its points with a step past `after[key]`.

    A key the client does not have yet, or one with more than `limit` new points, comes
    back downsampled in `reset` instead, so a reconnect after a long gap costs one
    bounded message rather than a flood.
    """
    keys = metric_keys(session, job_id)
    known = [k for k in keys if k in after]
    appended: dict[str, Series] = {}
    reset: dict[str, Series] = {}
    if known:
        # One statement for every key; each part is an index range scan from the cursor.
        parts = [
            select(MetricPoint.key, MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
            .where(
                MetricPoint.job_id == job_id,
                MetricPoint.key == key,
                MetricPoint.step > after[key],
            )
            .order_by(MetricPoint.step, MetricPoint.id)
            .limit(limit + 1)
            .subquery()
            for key in known
        ]
        rows: dict[str, list[Point]] = {}
        for key, step, epoch, value in session.execute(union_all(*(select(p) for p in parts))):
            rows.setdefault(key, []).append((step, epoch, value))
        for key, points in rows.items():
            if len(points) > limit:
                reset[key] = load_key(session, job_id, key, max_points)
            else:
                points.sort(key=lambda p: p[0])
                appended[key] = Series.of(points)
    for key in keys:
        if key not in after:
            series = load_key(session, job_id, key, max_points)
            if series:
                reset[key] = series
    return NewPoints(appended=appended, reset=reset)
