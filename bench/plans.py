"""The SQL an operation really sends, and the plans the database makes for it.

``captured(engine, fn)`` runs ``fn`` and records every statement the engine executed
(SQLAlchemy ``before_cursor_execute``), so the plans shown are those of the app's own
queries, not of hand-copied ones. ``explain`` replays one of them under ``EXPLAIN``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine


def captured(engine: Engine, fn: Callable[[], Any]) -> list[tuple[str, Any]]:
    """(statement, driver parameters) for every statement ``fn`` made ``engine`` run."""
    seen: list[tuple[str, Any]] = []

    def listen(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        fn()
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)
    return seen


def explain(engine: Engine, statement: str, params: Any) -> str:
    """The plan of one captured statement: ``EXPLAIN (ANALYZE, BUFFERS)`` on PostgreSQL
    (read-only statements only: it really runs them), ``EXPLAIN QUERY PLAN`` on SQLite."""
    with engine.connect() as c:
        if engine.dialect.name == "postgresql":
            rows = c.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement,
                                     params)
            text = "\n".join(r[0] for r in rows)
        else:
            rows = c.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            text = "\n".join(str(r[-1]) for r in rows)
        c.rollback()
    return text


def is_read(statement: str) -> bool:
    head = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
    return head in ("SELECT", "WITH") and " FOR UPDATE" not in statement.upper()


def plans_of(engine: Engine, fn: Callable[[], Any], *, limit: int = 40) -> list[dict[str, str]]:
    """Run ``fn`` once, then the plan of each distinct read statement it sent."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for statement, params in captured(engine, fn):
        if statement in seen or not is_read(statement):
            continue
        seen.add(statement)
        out.append({"sql": statement, "plan": explain(engine, statement, params)})
        if len(out) >= limit:
            break
    return out
