"""Bench 3: a claim + complete cycle through the operations (``app.ops.lanes.claim`` +
``complete``), one process, on SQLite and PostgreSQL.

Floor: what the cycle cannot do without — the same two conditional UPDATEs written by
hand in SQLAlchemy Core (claim the next todo task by priority then age; complete it if the
lease token still matches), each in its own transaction on the same engine and schema,
plus the same Redis commands (the lease check, record and drop Lua scripts). Target: the
operations reach >= 0.6x the floor's cycles/s.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from app.clock import to_ms, utcnow
from app.ops import lanes
from app.storage import leases, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import TaskStatus, task_table
from app.storage.redis_scripts import run_script
from bench.common import Env, Row, interleaved_rates
from bench.seed import analyze, seed_todo

T = task_table


class Floor:
    """The hand-written claim + complete on one lane. Its Redis calls are built by the same
    functions the operations use (``leases.check_call``, ``record_call``, ``drop_call``),
    so a change of a script's ARGV changes them both."""

    def __init__(self, ctx: Context, *, assignee: str, worker: str) -> None:
        self.ctx, self.assignee, self.worker = ctx, assignee, worker
        nxt = (sa.select(T.c.id)
               .where(T.c.assignee == assignee, T.c.status == TaskStatus.todo.value)
               .order_by(T.c.priority.desc(), T.c.created_at, T.c.id).limit(1))
        if ctx.engine.dialect.name == "postgresql":
            nxt = nxt.with_for_update(skip_locked=True)
        self.next_id = nxt.scalar_subquery()

    def _run(self, call: leases.Call) -> None:
        script, keys, args = call
        run_script(self.ctx, script, len(keys), *keys, *args)

    def cycle(self) -> None:
        now = utcnow()
        expires = now + timedelta(seconds=self.ctx.settings.lease_ttl_s)
        token = secrets.token_hex(16)
        a, w = self.assignee, self.worker
        self._run(leases.check_call(self.ctx, assignee=a, worker=w))
        with transaction(self.ctx.engine) as conn:
            row = conn.execute(
                sa.update(T).where(T.c.id == self.next_id, T.c.status == TaskStatus.todo.value)
                .values(status=TaskStatus.in_progress.value, claimed_by=self.worker,
                        lease_token=token, lease_expires_at=expires, updated_at=now)
                .returning(*T.c)).mappings().first()
        assert row is not None, "floor lane ran dry"
        self._run(leases.record_call(  # no clock-skew report (as a first claim)
            self.ctx, assignee=a, worker=w, task_id=row["id"], token=token,
            expires_ms=to_ms(expires), now_ms=to_ms(now), max_in_flight=1, metric="claims"))
        with transaction(self.ctx.engine) as conn:
            done = conn.execute(
                sa.update(T).where(T.c.id == row["id"],
                                   T.c.status == TaskStatus.in_progress.value,
                                   T.c.lease_token == token)
                .values(status=TaskStatus.done.value, completed_at=now, updated_at=now,
                        lease_token=None, lease_expires_at=None, result=None)
                .returning(*T.c)).mappings().first()
        assert done is not None
        self._run(leases.drop_call(self.ctx, assignee=a, worker=w, task_id=row["id"],
                                   token=token))


def ops_cycle(ctx: Context, *, assignee: str, worker: str) -> None:
    got = lanes.claim(ctx, assignee=assignee, worker=worker)
    assert got.get("lease") and not got.get("guard"), got
    lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                   outcome="success")


def measure(ctx: Context, *, n: int, rounds: int) -> dict[str, float]:
    """cycles/s of the operations and of the floor, interleaved on one database."""
    now = utcnow()
    total = n * rounds + 5
    with transaction(ctx.engine) as conn:
        for lane in ("b3ops", "b3floor"):
            store.ensure_lane(conn, assignee=lane, now=now, max_in_flight=1)
    for lane in ("b3ops", "b3floor"):
        seed_todo(ctx.engine, assignee=lane, n=total, now=now)
    analyze(ctx.engine)
    floor = Floor(ctx, assignee="b3floor", worker="f1")

    def ops() -> Any:
        return ops_cycle(ctx, assignee="b3ops", worker="o1")

    ops(), floor.cycle()  # warm: scripts loaded, statements compiled, pool filled
    return interleaved_rates({"ops": ops, "floor": floor.cycle}, n=n, rounds=rounds)


def run(env: Env) -> list[Row]:
    n, rounds = env.size(300, 5), env.size(5, 1)
    rows = []
    for backend, url in (("SQLite", env.sqlite_database()), ("PostgreSQL", env.pg_database())):
        ctx = env.context(url)
        try:
            got = measure(ctx, n=n, rounds=rounds)
        finally:
            ctx.close()
        rows.append(Row(
            bench=3, what=f"claim+complete via app.ops.lanes, 1 process, {backend}",
            figure=got["ops"], unit="cycles/s", baseline=got["floor"],
            baseline_what="floor: 2 Core UPDATEs + same Redis scripts", target=">= 0.6",
            details={"cyclesPerRound": n, "rounds": rounds}))
    return rows
