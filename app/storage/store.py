"""All SQL. Every function takes the open ``Connection`` of the caller's transaction and
keyword-only arguments; none commits. Rows come back as SQLAlchemy ``RowMapping``.

Locking: ``for_update=True`` adds ``FOR UPDATE`` on PostgreSQL (ignored by SQLite, where a
write transaction already holds the database's write lock from ``BEGIN IMMEDIATE``).
Lock order, to stay deadlock-free: lane row, then task rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from app import principal
from app.storage.db import hot
from app.storage.models import (
    TaskKind,
    TaskStatus,
    check_state_table,
    event_table,
    ffl_table,
    lane_table,
    task_table,
)

T = task_table
L = lane_table
F = ffl_table
E = event_table
C = check_state_table

ACTIVE = (TaskStatus.todo.value, TaskStatus.in_progress.value)


def _pg(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _insert(conn: Connection, table: sa.Table) -> Any:
    if _pg(conn):
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


# --- the one clock (SPEC 4.9) -----------------------------------------------------------

_SQLITE_NOW = "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"


def db_now(conn: Connection) -> datetime:
    """The database's time, in the caller's transaction: PostgreSQL's ``now()`` (the
    transaction's start: every statement of it agrees), SQLite's ``'now'`` -- the host's
    clock as SQLite's C library reads it, not this process's ``time.time`` (which a test
    may have shifted, and which is the only clock a caller could get wrong)."""
    if _pg(conn):
        got = conn.execute(sa.text("SELECT now()")).scalar_one()
        return got.astimezone(UTC)
    text = conn.execute(sa.text(_SQLITE_NOW)).scalar_one()
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- lanes ---------------------------------------------------------------------------


def get_lane(conn: Connection, *, assignee: str, for_update: bool = False) -> RowMapping | None:
    """The lane row, optionally locked."""
    q = sa.select(L).where(L.c.assignee == assignee)
    if for_update:
        q = q.with_for_update()
    return conn.execute(q).mappings().first()


def ensure_lane(conn: Connection, *, assignee: str, now: datetime, max_in_flight: int) -> None:
    """Create the lane row if it does not exist (race-safe upsert, no change otherwise)."""
    stmt = _insert(conn, L).values(
        assignee=assignee, paused=False, max_in_flight=max_in_flight, created_at=now
    ).on_conflict_do_nothing(index_elements=["assignee"])
    conn.execute(stmt)


def set_lane_pause(conn: Connection, *, assignee: str, paused: bool, reason: str | None,
                   now: datetime) -> None:
    """Pause or resume the lane row and mark its active tasks the same way."""
    lane_values: dict[str, Any] = {"paused": paused, "paused_reason": reason if paused else None}
    if paused:
        lane_values["paused_at"] = now
    else:
        lane_values.update(paused_at=None, resumed_at=now)
    conn.execute(sa.update(L).where(L.c.assignee == assignee).values(**lane_values))
    conn.execute(
        sa.update(T)
        .where(T.c.assignee == assignee, T.c.status.in_(ACTIVE))
        .values(
            lane_paused=paused,
            lane_paused_reason=reason if paused else None,
            lane_paused_at=now if paused else None,
            updated_at=now,
        )
    )


def set_lane_max_in_flight(conn: Connection, *, assignee: str, max_in_flight: int) -> None:
    conn.execute(sa.update(L).where(L.c.assignee == assignee).values(max_in_flight=max_in_flight))


def list_lanes(conn: Connection) -> Sequence[RowMapping]:
    return conn.execute(sa.select(L).order_by(L.c.assignee)).mappings().all()


def lane_status_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """``{assignee: {"todo": n, "in_progress": n, "dead": n}}``: the live work and the
    dead tasks waiting for an operator (requeue), read through the status index. Done and
    cancelled tasks are history: counting them would cost more as the store grows
    (``history`` and the event log answer for them)."""
    out: dict[str, dict[str, int]] = {}
    live = conn.execute(
        sa.select(T.c.assignee, T.c.status, sa.func.count())
        .where(T.c.status.in_([TaskStatus.todo.value, TaskStatus.in_progress.value,
                               TaskStatus.dead.value]))
        .group_by(T.c.assignee, T.c.status)
    ).all()
    for assignee, status, n in live:
        out.setdefault(assignee, {})[status] = int(n)
    return out


# --- tasks ---------------------------------------------------------------------------


def insert_task(conn: Connection, *, values: dict[str, Any]) -> RowMapping:
    """Insert one task and return its row."""
    row = conn.execute(sa.insert(T).values(**values).returning(*T.c)).mappings().one()
    return row


def get_task(conn: Connection, *, task_id: int, for_update: bool = False) -> RowMapping | None:
    q = sa.select(T).where(T.c.id == task_id)
    if for_update:
        q = q.with_for_update()
    return conn.execute(q).mappings().first()


def get_tasks(conn: Connection, *, task_ids: Sequence[int]) -> Sequence[RowMapping]:
    if not task_ids:
        return []
    return conn.execute(sa.select(T).where(T.c.id.in_(task_ids))).mappings().all()


def list_tasks(conn: Connection, *, assignee: str | None = None, status: str | None = None,
               limit: int = 100) -> Sequence[RowMapping]:
    q = sa.select(T)
    if assignee is not None:
        q = q.where(T.c.assignee == assignee)
    if status is not None:
        q = q.where(T.c.status == status)
    return conn.execute(q.order_by(T.c.id.desc()).limit(limit)).mappings().all()


def live_leases(conn: Connection, *, assignee: str, now: datetime) -> Sequence[RowMapping]:
    """In-progress tasks of the lane whose lease has not expired, soonest expiry first."""
    q = (
        sa.select(T)
        .where(T.c.assignee == assignee, T.c.status == TaskStatus.in_progress.value,
               T.c.lease_expires_at > now)
        .order_by(T.c.lease_expires_at)
    )
    return conn.execute(q).mappings().all()


def in_progress(conn: Connection, *, assignee: str) -> Sequence[RowMapping]:
    """Every in-progress task of a lane (live and expired leases), soonest expiry first."""
    q = (
        sa.select(T)
        .where(T.c.assignee == assignee, T.c.status == TaskStatus.in_progress.value)
        .order_by(T.c.lease_expires_at)
    )
    return conn.execute(q).mappings().all()


def requeue_tasks(conn: Connection, *, task_ids: Sequence[int], now: datetime) -> set[int]:
    """Return the given tasks to ``todo`` if their lease has expired by ``now``; answers the
    ids actually requeued (a complete that got there first wins)."""
    done = conn.execute(
        sa.update(T)
        .where(T.c.id.in_(list(task_ids)), T.c.status == TaskStatus.in_progress.value,
               T.c.lease_expires_at <= now)
        .values(status=TaskStatus.todo.value, claimed_by=None, lease_token=None,
                lease_expires_at=None, updated_at=now)
        .returning(T.c.id)
    ).scalars().all()
    return set(done)


def requeue_expired(conn: Connection, *, now: datetime, assignee: str | None = None,
                    limit: int | None = None) -> Sequence[RowMapping]:
    """Return expired in-progress tasks to ``todo``; answers the rows as they were."""
    cond = [T.c.status == TaskStatus.in_progress.value, T.c.lease_expires_at <= now]
    if assignee is not None:
        cond.append(T.c.assignee == assignee)
    sel = sa.select(T.c.id, T.c.assignee, T.c.claimed_by, T.c.lease_token,
                    T.c.lease_expires_at).where(*cond).order_by(T.c.id)
    if limit is not None:
        sel = sel.limit(limit)
    if _pg(conn):
        sel = sel.with_for_update(skip_locked=True)
    rows = conn.execute(sel).mappings().all()
    if rows:
        conn.execute(
            sa.update(T)
            .where(T.c.id.in_([r["id"] for r in rows]),
                   T.c.status == TaskStatus.in_progress.value)
            .values(status=TaskStatus.todo.value, claimed_by=None, lease_token=None,
                    lease_expires_at=None, updated_at=now)
        )
    return rows


def claim_next_pick(*, assignee: str, pg: bool, now: datetime | None = None
                    ) -> sa.Select[Any]:
    """The lane's next ``todo`` task id in claim order, read from ``ix_task_lane_queue``
    (row-locked, skipping locked rows, on PostgreSQL); with ``now``, only a task that is
    due (``not_before`` unset or passed)."""
    pick = (
        sa.select(T.c.id)
        .where(T.c.assignee == assignee, T.c.status == TaskStatus.todo.value)
        .order_by(T.c.priority.desc(), T.c.created_at, T.c.id)
        .limit(1)
    )
    if now is not None:
        pick = pick.where(sa.or_(T.c.not_before.is_(None), T.c.not_before <= now))
    return pick.with_for_update(skip_locked=True) if pg else pick


def claim_next(conn: Connection, *, assignee: str, worker: str, token: str,
               expires_at: datetime, now: datetime) -> RowMapping | None:
    """Lease the lane's next task -- highest priority, then oldest -- in one conditional
    UPDATE (its subquery row-locks the candidate, skipping locked rows, on PostgreSQL);
    answers the leased row, or None when the lane has nothing to claim."""
    pick = claim_next_pick(assignee=assignee, pg=_pg(conn), now=now)
    return conn.execute(
        sa.update(T)
        .where(T.c.id == pick.scalar_subquery(), T.c.status == TaskStatus.todo.value)
        .values(status=TaskStatus.in_progress.value, claimed_by=worker, lease_token=token,
                lease_expires_at=expires_at, updated_at=now)
        .returning(*T.c)
    ).mappings().first()


@dataclass
class ClaimRows:
    """What ``claim_pg`` answers: the paused lane, or the lease that refuses the claim, or
    the leases granted; and the expired leases it requeued on the way (old holder, token);
    and the database's time the claim decided by (``now``)."""

    now: datetime | None = None
    lane: dict[str, Any] | None = None
    paused: dict[str, Any] | None = None
    held: dict[str, Any] | None = None
    granted: list[dict[str, Any]] = field(default_factory=list)
    requeued: list[dict[str, Any]] = field(default_factory=list)


_CLAIM_PG = ("SELECT outcome, row_json FROM autonomy_claim(%(assignee)s, %(worker)s, "
             "%(tokens)s::text[], %(ttl_s)s::float8, %(test_now)s::timestamptz)")
_TIMES = ("lease_expires_at", "lane_paused_at", "created_at", "updated_at", "completed_at",
          "paused_at", "resumed_at", "not_before")


def claim_pg(engine: Engine, *, assignee: str, worker: str, tokens: Sequence[str],
             ttl_s: float, test_now: datetime | None = None) -> ClaimRows:
    """PostgreSQL: the whole claim -- pause check, expired leases requeued, both guards,
    up to ``len(tokens)`` leases of ``ttl_s`` within ``max_in_flight``, their events -- in
    one call of ``autonomy_claim`` (migrations 0005, 0006, 0009), one round trip, its own
    transaction (``db.hot``). The database's clock decides (``ClaimRows.now``);
    ``test_now`` is a test's injected clock (``Context.pinned_now``), None otherwise."""
    return _claim_rows(hot(engine, _CLAIM_PG, {
        "assignee": assignee, "worker": worker, "tokens": list(tokens), "ttl_s": ttl_s,
        "test_now": test_now}))


def _claim_rows(rows: Sequence[Any]) -> ClaimRows:
    """``autonomy_claim``'s ``(outcome, json)`` rows sorted into a ``ClaimRows``."""
    out = ClaimRows()
    for outcome, data in rows:
        if outcome == "clock":
            out.now = datetime.fromisoformat(data).astimezone(UTC)
            continue
        row = _json_row(data)
        if outcome == "granted":
            out.granted.append(row)
        elif outcome == "requeued":
            out.requeued.append(row)
        elif outcome == "held":
            out.held = row
        elif outcome == "lane":
            out.lane = row
        elif outcome == "paused":
            out.paused = row
    out.granted.sort(key=lambda r: (-r["priority"], r["created_at"], r["id"]))
    return out


def _json_row(data: Any) -> dict[str, Any]:
    """A row that came back as JSON, its timestamps made aware datetimes again."""
    row = dict(data)
    for k in _TIMES:
        v = row.get(k)
        if isinstance(v, str):
            row[k] = datetime.fromisoformat(v).astimezone(UTC)
    return row


_COMPLETE_PG = (
    "WITH done AS ("
    " UPDATE task SET status = 'done',"
    " completed_at = coalesce(%(now)s::timestamptz, now()),"
    " updated_at = coalesce(%(now)s::timestamptz, now()),"
    " lease_expires_at = NULL, result = %(result)s::json"
    " WHERE id = %(id)s AND status = 'in_progress' AND lease_token = %(token)s"
    " RETURNING *"
    "), ev AS ("
    " INSERT INTO event (at, kind, assignee, task_id, actor, data)"
    " SELECT done.completed_at, 'task_completed', done.assignee, done.id,"
    " coalesce(%(actor)s, done.claimed_by), %(data)s::json FROM done"
    ") SELECT to_json(done) FROM done")


def complete_pg(engine: Engine, *, task_id: int, token: str, now: datetime | None,
                result: dict[str, Any] | None, actor: str | None) -> dict[str, Any] | None:
    """PostgreSQL: ``mark_done`` and its ``task_completed`` event in one statement, one
    round trip, its own transaction (``db.hot``), at the database's time (``now`` is a
    test's injected clock, None otherwise). None when the lease is not live under this
    token -- the caller's full path then reads the row and answers the guard or
    refusal."""
    actor, data = principal.audit(actor)
    rows = hot(engine, _COMPLETE_PG, {
        "now": now, "result": None if result is None else json.dumps(result), "id": task_id,
        "token": token, "actor": actor, "data": json.dumps(data)})
    return _json_row(rows[0][0]) if rows else None


_COMPLETE_CLAIM_PG = (
    "SELECT outcome, row_json FROM autonomy_complete(%(id)s, %(token)s,"
    " %(result)s::json, %(actor)s, %(assignee)s, %(worker)s,"
    " %(tokens)s::text[], %(ttl_s)s::float8, %(test_now)s::timestamptz)")


def complete_claim_pg(engine: Engine, *, task_id: int, token: str,
                      result: dict[str, Any] | None, actor: str | None, assignee: str,
                      worker: str | None, tokens: Sequence[str], ttl_s: float,
                      test_now: datetime | None = None
                      ) -> tuple[dict[str, Any] | None, ClaimRows | None]:
    """PostgreSQL: ``complete_pg`` and then, when ``worker`` held the lease in
    ``assignee``, ``claim_pg`` for that worker -- one call of ``autonomy_complete``
    (migrations 0004, 0009), one round trip, one transaction (``db.hot``), on the
    database's clock (``test_now``: a test's injected one).
    Answers (the done row or None, the claim's rows or None when no claim was made)."""
    actor, _ = principal.audit(actor)  # the caller's own actor: lanes.complete's note
    rows = hot(engine, _COMPLETE_CLAIM_PG, {
        "id": task_id, "token": token,
        "result": None if result is None else json.dumps(result), "actor": actor,
        "assignee": assignee, "worker": worker, "tokens": list(tokens),
        "ttl_s": ttl_s, "test_now": test_now})
    if not rows or rows[0][0] != "done":
        return None, None
    done = _json_row(rows[0][1])
    return done, (_claim_rows(rows[1:]) if len(rows) > 1 else None)


_COMPLETE_MANY_PG = (
    "SELECT outcome, row_json FROM autonomy_complete_many(%(ids)s::bigint[],"
    " %(tokens)s::text[], %(results)s::json[], %(actor)s, %(assignee)s, %(worker)s,"
    " %(new_tokens)s::text[], %(ttl_s)s::float8, %(test_now)s::timestamptz)")


def complete_many_pg(engine: Engine, *, items: Sequence[tuple[int, str, dict[str, Any] | None]],
                     actor: str | None, assignee: str | None, worker: str | None,
                     new_tokens: Sequence[str], ttl_s: float,
                     test_now: datetime | None = None
                     ) -> tuple[list[dict[str, Any]], ClaimRows | None]:
    """PostgreSQL: several ``(task id, token, result)`` leases marked done, each fenced by
    its own token and with its own ``task_completed`` event, and then, when ``worker``
    held one of them in ``assignee``, up to ``len(new_tokens)`` next leases for it -- one
    call of ``autonomy_complete_many`` (migration 0010), one round trip, one commit
    (``db.hot``). Answers (the rows done, the claim's rows or None); an item left out
    matched nothing (its caller answers its guard or refusal)."""
    actor, _ = principal.audit(actor)
    rows = hot(engine, _COMPLETE_MANY_PG, {
        "ids": [i for i, _, _ in items], "tokens": [t for _, t, _ in items],
        "results": [None if r is None else json.dumps(r) for _, _, r in items],
        "actor": actor, "assignee": assignee, "worker": worker,
        "new_tokens": list(new_tokens), "ttl_s": ttl_s, "test_now": test_now})
    done = [_json_row(data) for outcome, data in rows if outcome == "done"]
    rest = [r for r in rows if r[0] != "done"]
    return done, (_claim_rows(rest) if rest else None)


_RESTAMP_PG = (
    "UPDATE event SET actor = %(actor)s,"
    " data = (coalesce(data::jsonb, '{}'::jsonb) || jsonb_build_object('actorNote', actor))::json"
    " WHERE at = %(now)s AND ("
    " (kind = 'lease_granted' AND task_id = ANY(%(granted)s) AND actor = %(worker)s) OR"
    " (kind = 'lease_requeued' AND task_id = ANY(%(requeued)s)"
    " AND actor = 'claim:' || %(worker)s)) RETURNING id")


def restamp_claim_pg(engine: Engine, *, granted: Sequence[int], requeued: Sequence[int],
                     now: datetime, worker: str, actor: str) -> None:
    """PostgreSQL: the events ``autonomy_claim`` wrote naming the worker (``lease_granted``,
    and ``lease_requeued`` as ``claim:<worker>``) re-stamped with the credential as actor,
    what they named as its note. Under a credential only, and only when they differ: one
    more statement then."""
    hot(engine, _RESTAMP_PG, {"actor": actor, "granted": list(granted),
                              "requeued": list(requeued), "now": now, "worker": worker})


def extend_lease(conn: Connection, *, task_id: int, token: str, expires_at: datetime,
                 now: datetime) -> bool:
    res = conn.execute(
        sa.update(T)
        .where(T.c.id == task_id, T.c.status == TaskStatus.in_progress.value,
               T.c.lease_token == token)
        .values(lease_expires_at=expires_at, updated_at=now)
    )
    return res.rowcount == 1


def mark_done(conn: Connection, *, task_id: int, token: str, now: datetime,
              result: dict[str, Any] | None) -> RowMapping | None:
    """Conditionally mark a leased task done. Its ``lease_token`` stays: a done task keeps
    the token of the lease that completed it, which tells an idempotent retry of that
    complete from a superseded lease's late one (SPEC 4.2)."""
    return conn.execute(
        sa.update(T)
        .where(T.c.id == task_id, T.c.status == TaskStatus.in_progress.value,
               T.c.lease_token == token)
        .values(status=TaskStatus.done.value, completed_at=now, updated_at=now,
                lease_expires_at=None, result=result)
        .returning(*T.c)
    ).mappings().first()


def return_failed(conn: Connection, *, task_id: int, token: str, fingerprint: str, reason: str,
                  now: datetime, result: dict[str, Any] | None,
                  status: str = TaskStatus.todo.value, not_before: datetime | None = None
                  ) -> RowMapping | None:
    """Conditionally end a failed in-progress task's lease with attempts + 1: back to
    ``todo`` (claimable from ``not_before``, its backoff), or ``dead`` (``status``) at
    its lane's ``max_attempts`` (a finished task's time is its ``updated_at``;
    ``completed_at`` stays a success's)."""
    return conn.execute(
        sa.update(T)
        .where(T.c.id == task_id, T.c.status == TaskStatus.in_progress.value,
               T.c.lease_token == token)
        .values(status=status, attempts=T.c.attempts + 1,
                failure_fingerprint=fingerprint, last_validation_reason=reason,
                claimed_by=None, lease_token=None, lease_expires_at=None, updated_at=now,
                result=result, not_before=not_before)
        .returning(*T.c)
    ).mappings().first()


def release_lease(conn: Connection, *, task_id: int, token: str, now: datetime) -> bool:
    """Give a lease back without an outcome: the task returns to ``todo`` untouched."""
    res = conn.execute(
        sa.update(T)
        .where(T.c.id == task_id, T.c.status == TaskStatus.in_progress.value,
               T.c.lease_token == token)
        .values(status=TaskStatus.todo.value, claimed_by=None, lease_token=None,
                lease_expires_at=None, updated_at=now)
    )
    return res.rowcount == 1


def open_remediation(conn: Connection, *, fingerprint: str) -> RowMapping | None:
    """The open ops remediation task for a fingerprint, if any."""
    return conn.execute(
        sa.select(T).where(T.c.failure_fingerprint == fingerprint,
                           T.c.kind == TaskKind.ops_remediation.value,
                           T.c.status.in_(ACTIVE)).limit(1)
    ).mappings().first()


_CREATE_PG = (
    "WITH clk AS (SELECT coalesce(%(now)s::timestamptz, now()) AS at"
    "), new_lane AS ("
    " INSERT INTO lane (assignee, paused, max_in_flight, created_at)"
    " SELECT %(assignee)s, false, %(max_in_flight)s, clk.at FROM clk"
    " ON CONFLICT (assignee) DO NOTHING"
    " RETURNING paused, paused_reason, paused_at"
    "), l AS ("
    " SELECT paused, paused_reason, paused_at FROM new_lane UNION ALL"
    " SELECT paused, paused_reason, paused_at FROM lane WHERE assignee = %(assignee)s"
    "), t AS ("
    " INSERT INTO task (title, assignee, kind, status, priority, payload, attempts,"
    " lane_paused, lane_paused_reason, lane_paused_at, created_at, updated_at, not_before)"
    " SELECT %(title)s, %(assignee)s, %(kind)s, 'todo', %(priority)s, %(payload)s::json, 0,"
    " l.paused, CASE WHEN l.paused THEN l.paused_reason END,"
    " CASE WHEN l.paused THEN l.paused_at END, clk.at, clk.at,"
    " coalesce(%(not_before)s::timestamptz,"
    " clk.at + %(delay_s)s::float8 * interval '1 second')"
    " FROM (SELECT * FROM l LIMIT 1) l, clk"
    " RETURNING *"
    "), ev AS ("
    " INSERT INTO event (at, kind, assignee, task_id, actor, data)"
    " SELECT t.created_at, 'task_created', t.assignee, t.id, %(actor)s, %(data)s::json FROM t"
    "), woke AS ("
    " SELECT pg_notify('autonomy_lane', t.assignee) FROM t WHERE NOT t.lane_paused"
    ") SELECT to_json(t), (SELECT count(*) FROM woke) FROM t")


def create_pg(engine: Engine, *, values: dict[str, Any], now: datetime | None,
              max_in_flight: int, actor: str | None, delay_s: float | None = None
              ) -> dict[str, Any] | None:
    """PostgreSQL: ``create`` in one statement -- the lane row on first use, the task with
    the lane's pause stamped on it, its ``task_created`` event and the lane's NOTIFY (when
    not paused) -- one round trip, its own transaction (``db.hot``; never repeated: a
    create is not idempotent). None when the lane row was being created by another
    statement at the same moment (the caller's transaction path then runs). Its times are
    the database's (``now``: a test's injected clock, else None); ``delay_s`` makes
    ``not_before`` that long after it (a create's ``delayS``, on the one clock)."""
    actor, data = principal.audit(actor)
    rows = hot(engine, _CREATE_PG, {
        "assignee": values["assignee"], "max_in_flight": max_in_flight, "now": now,
        "title": values["title"], "kind": values["kind"], "priority": values["priority"],
        "payload": json.dumps(values["payload"]), "actor": actor, "data": json.dumps(data),
        "not_before": values.get("not_before"), "delay_s": delay_s}, repeatable=False)
    return _json_row(rows[0][0]) if rows else None


def notify_lane(conn: Connection, *, assignee: str) -> None:
    """PostgreSQL: ``NOTIFY`` the lane's waiters when this transaction commits (push
    pickup's fallback while Redis is degraded; ``app/storage/pickup.py``). SQLite: nothing."""
    if _pg(conn):
        conn.execute(sa.text("SELECT pg_notify('autonomy_lane', :a)"), {"a": assignee})


def count_todo(conn: Connection, *, assignee: str, limit: int) -> int:
    """How many ``todo`` tasks the lane has, counted up to ``limit`` (the lane index)."""
    sub = (sa.select(T.c.id).where(T.c.assignee == assignee,
                                   T.c.status == TaskStatus.todo.value).limit(limit))
    return int(conn.execute(sa.select(sa.func.count()).select_from(sub.subquery())).scalar_one())


# --- failure fingerprints ---------------------------------------------------------------


def insert_fingerprint(conn: Connection, *, fingerprint: str, assignee: str, reason: str,
                       task_id: int, now: datetime) -> None:
    conn.execute(sa.insert(F).values(fingerprint=fingerprint, assignee=assignee, reason=reason,
                                     task_id=task_id, created_at=now))


def count_fingerprint(conn: Connection, *, fingerprint: str, since: datetime) -> int:
    """Failures of one fingerprint since a time (index ``ix_ffl_fingerprint_created``)."""
    return int(conn.execute(
        sa.select(sa.func.count()).select_from(F)
        .where(F.c.fingerprint == fingerprint, F.c.created_at >= since)
    ).scalar_one())


def fingerprint_task_ids(conn: Connection, *, fingerprint: str, since: datetime,
                         limit: int = 50) -> list[int]:
    rows = conn.execute(
        sa.select(F.c.task_id).where(F.c.fingerprint == fingerprint, F.c.created_at >= since)
        .order_by(F.c.created_at).limit(limit)
    ).scalars().all()
    return list(dict.fromkeys(int(r) for r in rows))


def recent_fingerprints(conn: Connection, *, since: datetime, limit: int = 20
                        ) -> Sequence[RowMapping]:
    """Fingerprints seen since a time, most frequent first."""
    n = sa.func.count().label("count")
    return conn.execute(
        sa.select(F.c.fingerprint, F.c.assignee, n, sa.func.max(F.c.created_at).label("last_at"))
        .where(F.c.created_at >= since)
        .group_by(F.c.fingerprint, F.c.assignee)
        .order_by(n.desc()).limit(limit)
    ).mappings().all()


# --- events --------------------------------------------------------------------------


def insert_event(conn: Connection, *, kind: str, at: datetime, assignee: str | None = None,
                 task_id: int | None = None, actor: str | None = None,
                 reason: str | None = None, data: dict[str, Any] | None = None) -> None:
    """One event; under a principal its actor is the credential (``principal.audit``)."""
    actor, data = principal.audit(actor, data)
    conn.execute(sa.insert(E).values(kind=kind, at=at, assignee=assignee, task_id=task_id,
                                     actor=actor, reason=reason, data=data))


def insert_events(conn: Connection, *, rows: list[dict[str, Any]]) -> None:
    """Events in one statement; actors as ``insert_event`` records them."""
    if rows:
        base: dict[str, Any] = {"assignee": None, "task_id": None, "actor": None,
                                "reason": None, "data": {}}
        out = []
        for r in rows:
            row = {**base, **r}
            row["actor"], row["data"] = principal.audit(row["actor"], row["data"])
            out.append(row)
        conn.execute(sa.insert(E), out)


def list_events(conn: Connection, *, task_id: int | None = None, assignee: str | None = None,
                kind: str | None = None, limit: int = 200) -> Sequence[RowMapping]:
    """Newest events first, filtered by task, lane or kind."""
    q = sa.select(E)
    if task_id is not None:
        q = q.where(E.c.task_id == task_id)
    if assignee is not None:
        q = q.where(E.c.assignee == assignee)
    if kind is not None:
        q = q.where(E.c.kind == kind)
    return conn.execute(q.order_by(E.c.id.desc()).limit(limit)).mappings().all()


# --- check state -----------------------------------------------------------------------


def read_check_state(conn: Connection, *, name: str) -> RowMapping | None:
    return conn.execute(sa.select(C).where(C.c.name == name)).mappings().first()


def write_check_state(conn: Connection, *, name: str, data: str, now: datetime) -> None:
    """Upsert one state row; atomic with the caller's transaction."""
    stmt = _insert(conn, C).values(name=name, data=data, written_at=now)
    stmt = stmt.on_conflict_do_update(index_elements=["name"],
                                      set_={"data": data, "written_at": now})
    conn.execute(stmt)


def read_check_states(conn: Connection, *, names: Sequence[str]) -> dict[str, RowMapping]:
    rows = conn.execute(sa.select(C).where(C.c.name.in_(list(names)))).mappings().all()
    return {r["name"]: r for r in rows}


# --- queue signals for the checks ---------------------------------------------------------


def queue_signals(conn: Connection, *, now: datetime) -> dict[str, Any]:
    """What the checks ask of the queue, each an index lookup (no count over all tasks):
    is there claimable backlog, how many in-progress leases have expired, and when did
    the last task complete."""
    backlog = conn.execute(
        sa.select(T.c.id).where(T.c.status == TaskStatus.todo.value,
                                T.c.lane_paused == sa.false()).limit(1)
    ).first() is not None
    expired = conn.execute(
        sa.select(sa.func.count()).select_from(T)
        .where(T.c.status == TaskStatus.in_progress.value, T.c.lease_expires_at <= now)
    ).scalar_one()
    last_done = conn.execute(sa.select(sa.func.max(T.c.completed_at))).scalar()
    return {"backlog": backlog, "expiredLeases": int(expired), "lastCompletedAt": last_done}


# --- the task lifecycle (SPEC 4.11, migration 0006) ---------------------------------------


def insert_task_deduped(conn: Connection, *, values: dict[str, Any]) -> RowMapping | None:
    """Insert one task carrying a ``dedupe_key``; None when the lane already has a task
    with that key (``ux_task_dedupe``: the index decides, so racing inserts make one)."""
    stmt = (_insert(conn, T).values(**values)
            .on_conflict_do_nothing(index_elements=["assignee", "dedupe_key"],
                                    index_where=T.c.dedupe_key.isnot(None))
            .returning(*T.c))
    return conn.execute(stmt).mappings().first()


def get_task_by_dedupe_key(conn: Connection, *, assignee: str, dedupe_key: str
                           ) -> RowMapping | None:
    """The lane's task with this dedupe key, if any (``ux_task_dedupe``)."""
    return conn.execute(sa.select(T).where(T.c.assignee == assignee,
                                           T.c.dedupe_key == dedupe_key)).mappings().first()


def cancel_task(conn: Connection, *, task_id: int, now: datetime) -> RowMapping | None:
    """Conditionally end a ``todo`` or ``in_progress`` task as ``cancelled``; answers the
    row as it is now, or None when it was not active (a complete got there first). The
    lease token stays on the row, so the holder's late calls are told ``task_cancelled``."""
    return conn.execute(
        sa.update(T)
        .where(T.c.id == task_id, T.c.status.in_(ACTIVE))
        .values(status=TaskStatus.cancelled.value, lease_expires_at=None, lease_slot=None,
                not_before=None, updated_at=now)
        .returning(*T.c)
    ).mappings().first()


def requeue_dead(conn: Connection, *, task_id: int, now: datetime) -> RowMapping | None:
    """Conditionally bring a ``dead`` task back to ``todo`` with its attempts reset and no
    backoff; None when it was not dead."""
    return conn.execute(
        sa.update(T)
        .where(T.c.id == task_id, T.c.status == TaskStatus.dead.value)
        .values(status=TaskStatus.todo.value, attempts=0, not_before=None,
                claimed_by=None, lease_token=None, lease_expires_at=None, updated_at=now)
        .returning(*T.c)
    ).mappings().first()


def list_tasks_page(conn: Connection, *, assignee: str | None = None,
                    status: str | None = None, kind: str | None = None,
                    after: int | None = None, limit: int = 50) -> Sequence[RowMapping]:
    """Tasks newest first (by id), filtered; ``after`` is the last id of the previous page
    (keyset pagination: the page after it holds the ids below it)."""
    q = sa.select(T)
    if assignee is not None:
        q = q.where(T.c.assignee == assignee)
    if status is not None:
        q = q.where(T.c.status == status)
    if kind is not None:
        q = q.where(T.c.kind == kind)
    if after is not None:
        q = q.where(T.c.id < after)
    return conn.execute(q.order_by(T.c.id.desc()).limit(limit)).mappings().all()


def next_due(conn: Connection, *, assignee: str, now: datetime) -> datetime | None:
    """When the lane's soonest ``todo`` task that is not yet due falls due, or None."""
    got = conn.execute(
        sa.select(sa.func.min(T.c.not_before))
        .where(T.c.assignee == assignee, T.c.status == TaskStatus.todo.value,
               T.c.not_before > now)
    ).scalar()
    if isinstance(got, datetime):  # SQLite's aggregate comes back naive UTC
        return got.replace(tzinfo=UTC) if got.tzinfo is None else got
    if isinstance(got, str):
        return datetime.fromisoformat(got).replace(tzinfo=UTC)
    return None


def set_lane_lifecycle(conn: Connection, *, assignee: str, values: dict[str, Any]) -> None:
    """Set a lane's ``max_attempts``, ``backoff_base_s``, ``backoff_cap_s`` (those given)."""
    if values:
        conn.execute(sa.update(L).where(L.c.assignee == assignee).values(**values))


# --- retention (the ``retention`` job, SPEC 4.11) ---------------------------------------------

FINISHED = (TaskStatus.done.value, TaskStatus.cancelled.value, TaskStatus.dead.value)


def prune_finished_tasks(conn: Connection, *, before: datetime, limit: int
                         ) -> tuple[int, int]:
    """Delete up to ``limit`` finished tasks last updated before ``before`` (oldest
    first, ``ix_task_finished``; rows locked by someone else are skipped on PostgreSQL)
    with their events; answers (tasks, events) deleted."""
    pick = (sa.select(T.c.id).where(T.c.status.in_(FINISHED), T.c.updated_at < before)
            .order_by(T.c.updated_at).limit(limit))
    if _pg(conn):
        pick = pick.with_for_update(skip_locked=True)
    ids = list(conn.execute(pick).scalars().all())
    if not ids:
        return 0, 0
    events = conn.execute(sa.delete(E).where(E.c.task_id.in_(ids))).rowcount
    tasks = conn.execute(sa.delete(T).where(T.c.id.in_(ids), T.c.status.in_(FINISHED))
                         ).rowcount
    return int(tasks), int(events)


def prune_fingerprints(conn: Connection, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` fingerprint rows written before ``before`` (oldest first,
    ``ix_ffl_created_at``); answers how many."""
    pick = sa.select(F.c.id).where(F.c.created_at < before).order_by(F.c.created_at) \
        .limit(limit)
    ids = list(conn.execute(pick).scalars().all())
    if not ids:
        return 0
    return int(conn.execute(sa.delete(F).where(F.c.id.in_(ids))).rowcount)
