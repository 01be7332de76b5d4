"""Retention (SPEC 4.11): the ``retention`` job prunes finished tasks, their events and
fingerprint rows older than the setting, in bounded batches under its run-lock, and
counts what it pruned in status and ``/metrics`` -- SQLite and PostgreSQL, frozen clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from app.api.metrics import render
from app.clock import FrozenClock
from app.ops import lane_control, lanes, lifecycle
from app.ops.checks import jobs
from app.ops.checks.status import build_status
from app.settings import Settings
from app.storage.context import Context
from app.storage.db import transaction
from tests.conftest import make_settings

DAY_S = 86400


@pytest.fixture
def rctx(database_url: str, redis_server_url: str, redis_prefix: str, clock: FrozenClock
         ) -> Iterator[Context]:
    """Retention after 2 days, in batches of 2, at most 2 batches a run."""
    c = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                            retention_finished_s=2 * DAY_S,
                                            retention_batch=2, retention_max_batches=2,
                                            backoff_base_s=0), clock=clock)
    yield c
    c.close()


def _count(ctx: Context, sql: str) -> int:
    with transaction(ctx.engine, write=False) as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def _finish(ctx: Context) -> dict[str, int]:
    """Five finished tasks (2 done, 2 cancelled, 1 dead, with a fingerprint row) and one
    still to do."""
    lane_control.configure_lane(ctx, assignee="coder", max_attempts=1, max_in_flight=5)
    ids = {f"t{n}": lanes.create(ctx, assignee="coder", title=f"t{n}",
                                 dedupe_key=f"k{n}")["task"]["id"] for n in range(6)}
    for name in ("t0", "t1"):
        c = lanes.claim(ctx, assignee="coder", worker=f"w-{name}")
        lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                       outcome="success")
    c = lanes.claim(ctx, assignee="coder", worker="w-t2")
    lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                   outcome="failure", validation_reason="boom")
    lifecycle.cancel(ctx, task_id=ids["t3"])
    lifecycle.cancel(ctx, task_id=ids["t4"])
    return ids


def test_retention_prunes_only_what_finished_before_the_window_in_bounded_batches(
        rctx: Context, clock: FrozenClock) -> None:
    ids = _finish(rctx)
    assert jobs.run_job(rctx, "retention")["pruned"] == {"tasks": 0, "events": 0,
                                                         "fingerprints": 0}
    clock.advance(seconds=2 * DAY_S + 1)
    late = lanes.create(rctx, assignee="coder", title="recent")["task"]["id"]
    lifecycle.cancel(rctx, task_id=late)  # finished, but inside the window
    first = jobs.run_job(rctx, "retention")
    assert first["pruned"]["tasks"] == 4 and first["more"] is True  # 2 batches of 2
    assert first["pruned"]["fingerprints"] == 1 and first["pruned"]["events"] > 0
    second = jobs.run_job(rctx, "retention")
    assert second["pruned"]["tasks"] == 1 and second["more"] is False
    with transaction(rctx.engine, write=False) as conn:
        left = set(conn.execute(sa.text("SELECT id FROM task WHERE assignee = 'coder'"))
                   .scalars())
    assert left == {ids["t5"], late}  # the live task and the recent one stay
    assert _count(rctx, "SELECT count(*) FROM event WHERE task_id IN "
                        f"({','.join(str(ids[n]) for n in ('t0', 't1', 't2', 't3', 't4'))})"
                  ) == 0
    assert _count(rctx, f"SELECT count(*) FROM event WHERE task_id = {ids['t5']}") == 1
    assert _count(rctx, "SELECT count(*) FROM failure_fingerprint_log") == 0
    status = build_status(rctx)["retention"]
    assert status["prunedTotal"]["tasks"] == 5 and status["lastRunAt"] is not None
    assert status["prunedTotal"]["fingerprints"] == 1
    text = render(build_status(rctx)).decode()
    assert "autonomy_retention_pruned_tasks_total 5.0" in text
    assert "autonomy_retention_pruned_fingerprints_total 1.0" in text
    # a pruned task's dedupe key makes a new task; a live one's still answers its task
    again = lanes.create(rctx, assignee="coder", title="t0 again", dedupe_key="k0")
    assert "guard" not in again and again["task"]["id"] not in ids.values()
    assert lanes.create(rctx, assignee="coder", title="x", dedupe_key="k5")["guard"] == \
        "duplicate_create_guard"


def test_a_second_retention_run_while_one_holds_the_lock_is_skipped(rctx: Context) -> None:
    from app.storage import locks

    token = locks.acquire(rctx, "retention", budget_ms=60_000, holder="other:1:retention")
    try:
        assert jobs.run_job(rctx, "retention")["skipped"] == "already_running"
    finally:
        locks.release(rctx, "retention", token)


def test_retention_may_not_prune_the_breaker_window() -> None:
    with pytest.raises(ValidationError):
        Settings(retention_finished_s=3600, breaker_window_h=24)
