"""Set-based seeding: one ``INSERT ... SELECT`` over a number series per call (PostgreSQL
``generate_series``, SQLite a recursive CTE), never a row at a time.

Timestamps are written in each backend's own storage form (``timestamptz`` on PostgreSQL,
``'YYYY-MM-DD HH:MM:SS.ffffff'`` UTC text on SQLite, as ``app.storage.models.UTCDateTime`` does),
so the app reads seeded rows exactly like its own.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

TASK_COLS = ("title, assignee, kind, status, priority, payload, attempts, claimed_by, "
             "lease_token, lease_expires_at, lane_paused, created_at, updated_at, completed_at")


def _pg(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _series(engine: Engine) -> tuple[str, str]:
    """(prefix, from-clause) making ``g`` run from :lo to :hi."""
    if _pg(engine):
        return "", "FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) AS s(g)"
    return ("WITH RECURSIVE s(g) AS (SELECT :lo UNION ALL SELECT g + 1 FROM s WHERE g < :hi) ",
            "FROM s")


def _at(engine: Engine, hours_expr: str) -> str:
    """SQL for ``:now - hours_expr hours`` in the backend's storage form."""
    if _pg(engine):
        return f"(CAST(:now AS timestamptz) - ({hours_expr}) * interval '1 hour')"
    return (f"(strftime('%Y-%m-%d %H:%M:%S', :now, '-' || ({hours_expr}) || ' hours')"
            " || '.000000')")


def _now_param(engine: Engine, now: datetime) -> str | datetime:
    now = now.astimezone(UTC)
    if _pg(engine):
        return now
    return now.strftime("%Y-%m-%d %H:%M:%S")


def _str(expr: str = "g") -> str:
    return f"CAST(({expr}) AS TEXT)"


def seed_todo(engine: Engine, *, assignee: str, n: int, now: datetime) -> None:
    """``n`` todo tasks in one lane, all created ``now`` (claimed in id order)."""
    pre, src = _series(engine)
    at = _at(engine, "0")
    sql = (f"{pre}INSERT INTO task ({TASK_COLS}) "
           f"SELECT 'bench ' || {_str()}, :a, 'work', 'todo', 0, '{{}}', 0, NULL, NULL, "
           f"NULL, false, {at}, {at}, NULL {src}")
    with engine.begin() as c:
        c.execute(sa.text(sql), {"lo": 1, "hi": n, "a": assignee,
                                 "now": _now_param(engine, now)})


def seed_history(engine: Engine, *, lo: int, hi: int, lanes: int, now: datetime,
                 days: int = 30) -> None:
    """Tasks ``lo..hi`` as finished history: done (1 in 50 cancelled), spread over ``days``
    days and ``lanes`` lanes (``lane0`` ...)."""
    pre, src = _series(engine)
    hours = f"(g % {days * 24}) + 1"
    created, completed = _at(engine, f"{hours} + 1"), _at(engine, hours)
    sql = (f"{pre}INSERT INTO task ({TASK_COLS}) "
           f"SELECT 'history ' || {_str()}, 'lane' || {_str(f'g % {lanes}')}, "
           f"'work', CASE WHEN g % 50 = 0 THEN 'cancelled' ELSE 'done' END, g % 5, '{{}}', "
           f"1, 'w' || {_str('g % 97')}, NULL, NULL, false, "
           f"{created}, {completed}, {completed} {src}")
    with engine.begin() as c:
        c.execute(sa.text(sql), {"lo": lo, "hi": hi, "now": _now_param(engine, now)})


def seed_active(engine: Engine, *, todo: int, in_progress: int, lanes: int,
                now: datetime) -> None:
    """The live part of a fleet: ``todo`` queued tasks and ``in_progress`` tasks under live
    leases (one hour left), over ``lanes`` lanes. Creates the lane rows."""
    pre, src = _series(engine)
    lane = f"'lane' || {_str(f'g % {lanes}')}"
    recent = _at(engine, "(g % 24)")
    lease_at = _at(engine, "-1")
    with engine.begin() as c:
        c.execute(sa.text(
            f"{pre}INSERT INTO lane (assignee, paused, max_in_flight, created_at) "
            f"SELECT 'lane' || {_str()}, false, 1000, {_at(engine, '24 * 30 + 2')} "
            f"{src}"), {"lo": 0, "hi": lanes - 1, "now": _now_param(engine, now)})
        c.execute(sa.text(
            f"{pre}INSERT INTO task ({TASK_COLS}) "
            f"SELECT 'queued ' || {_str()}, {lane}, 'work', 'todo', g % 5, '{{}}', 0, "
            f"NULL, NULL, NULL, false, {recent}, {recent}, NULL {src}"),
            {"lo": 1, "hi": todo, "now": _now_param(engine, now)})
        c.execute(sa.text(
            f"{pre}INSERT INTO task ({TASK_COLS}) "
            f"SELECT 'leased ' || {_str()}, {lane}, 'work', 'in_progress', 0, '{{}}', 0, "
            f"'w' || {_str()}, 'tok' || {_str()}, {lease_at}, false, {recent}, "
            f"{recent}, NULL {src}"),
            {"lo": 1, "hi": in_progress, "now": _now_param(engine, now)})


def seed_fingerprints(engine: Engine, *, lo: int, hi: int, distinct: int, now: datetime,
                      days: int = 30) -> None:
    """Failure-log rows ``lo..hi`` over ``distinct`` fingerprints (``laneK:reason <n>``),
    spread evenly over ``days`` days."""
    pre, src = _series(engine)
    fp = f"(g % {distinct})"
    lane = f"(g % {distinct} % 20)"
    sql = (f"{pre}INSERT INTO failure_fingerprint_log (fingerprint, assignee, reason, task_id, "
           f"created_at) SELECT 'lane' || {_str(lane)} || '\\:reason <n> #' || "
           f"{_str(fp)}, 'lane' || {_str(lane)}, 'reason ' || {_str()}, g, "
           f"{_at(engine, f'(g % {days * 24}) + 0.5')} {src}")
    with engine.begin() as c:
        c.execute(sa.text(sql), {"lo": lo, "hi": hi, "now": _now_param(engine, now)})


def analyze(engine: Engine) -> None:
    """Refresh the planner's statistics after a bulk load (what autovacuum would do)."""
    with engine.connect() as c:
        if _pg(engine):
            c.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        else:
            c.exec_driver_sql("ANALYZE")
            c.commit()


def explain(engine: Engine, sql: str, params: dict[str, object]) -> str:
    """The plan of one statement (``EXPLAIN ANALYZE`` on PostgreSQL, ``EXPLAIN QUERY PLAN``
    on SQLite), as text."""
    with engine.connect() as c:
        if _pg(engine):
            rows = c.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql), params)
            return "\n".join(r[0] for r in rows)
        rows = c.execute(sa.text("EXPLAIN QUERY PLAN " + sql), params)
        return "\n".join(str(r[-1]) for r in rows)
