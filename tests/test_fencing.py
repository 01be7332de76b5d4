"""Run-lock fencing (SPEC 4.7): a check run whose lock was broken or taken over writes
neither its state nor its side effects (requeues, releases); the refusal is an event.
Before: such a run wrote everything and answered ``lockLost: true``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.clock import FrozenClock
from app.ops import lanes
from app.ops.checks import handoff, jobs, selfheal, state
from app.storage import locks, store
from app.storage.context import Context
from app.storage.db import transaction


def _steal(ctx: Context, job: str) -> None:
    """The run's lock is broken (as a dead holder's) and another run takes it."""
    ctx.redis.delete(ctx.keys.lock(job))
    assert locks.acquire(ctx, job, budget_ms=60_000, holder="the-next-run") is not None


def _stealing(ctx: Context, job: str, check: Callable[..., dict[str, Any]]
              ) -> Callable[[Context, state.Fence], dict[str, Any]]:
    def run(c: Context, fence: state.Fence) -> dict[str, Any]:
        _steal(ctx, job)
        return check(c, fence)
    return run


def _states(ctx: Context) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        return dict(store.read_check_states(conn, names=[state.HANDOFF, state.SELF_HEAL,
                                                         state.job_state_name("handoff_health"),
                                                         state.job_state_name("self_heal")]))


def _fenced_events(ctx: Context) -> list[dict[str, Any]]:
    with transaction(ctx.engine, write=False) as conn:
        return [dict(e) for e in store.list_events(conn, kind="run_lock_fenced")]


def test_a_handoff_run_that_lost_its_lock_writes_nothing_and_leaves_an_event(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(jobs.CHECKS, "handoff_health",
                        _stealing(ctx, "handoff_health", handoff.run_handoff))
    with pytest.raises(locks.RunLockLost) as err:
        jobs.run_job(ctx, "handoff_health", holder="the-first-run")
    assert err.value.code == "run_lock_lost"
    assert _states(ctx) == {}  # neither the snapshot nor the run's record
    events = _fenced_events(ctx)
    assert len(events) == 1 and events[0]["reason"] == "run_lock_lost"
    assert events[0]["data"] == {"job": "handoff_health", "holder": "the-first-run",
                                 "refused": "the handoff snapshot"}
    # the lock is the next run's, untouched by the fenced run's release
    assert locks.holder_of(ctx, "handoff_health")["holder"] == "the-next-run"  # type: ignore[index]


def test_a_self_heal_run_that_lost_its_lock_requeues_nothing(
        ctx: Context, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    lanes.create(ctx, assignee="coder", title="t")
    tid = lanes.claim(ctx, assignee="coder", worker="w1")["task"]["id"]
    clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
    monkeypatch.setitem(jobs.CHECKS, "self_heal",
                        _stealing(ctx, "self_heal", selfheal.run_self_heal))
    with pytest.raises(locks.RunLockLost):
        jobs.run_job(ctx, "self_heal", holder="the-first-run")
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
    assert row is not None and row["status"] == "in_progress"  # not requeued by it
    assert _states(ctx) == {}
    assert [e["data"]["refused"] for e in _fenced_events(ctx)] == [
        "the requeue of expired leases"]


def test_a_run_that_keeps_its_lock_writes_as_before(ctx: Context) -> None:
    out = jobs.run_job(ctx, "handoff_health", holder="only")
    assert out["lockLost"] is False and state.HANDOFF in _states(ctx)
    assert _fenced_events(ctx) == []
