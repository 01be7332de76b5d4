"""The periodic checks (SPEC 4.4-4.6), each change-log row its own test, on SQLite and
PostgreSQL with a real Redis and an injected clock (no sleeping)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from app.clock import FrozenClock
from app.errors import AutonomyError, InvalidInput
from app.ops import lanes
from app.ops.checks import handoff, jobs, readiness, selfheal, state, status
from app.storage import locks, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import check_state_table


def _write_raw(ctx: Context, name: str, data: str, *, at: Any = None) -> None:
    with transaction(ctx.engine) as conn:
        store.write_check_state(conn, name=name, data=data, now=at or ctx.clock())


def _write(ctx: Context, name: str, data: dict[str, Any], *, at: Any = None) -> None:
    with transaction(ctx.engine) as conn:
        state.write(conn, name=name, data=data, now=at or ctx.clock())


def _status(ctx: Context) -> dict[str, Any]:
    return status.build_status(ctx)


# --- 4.4 stale state ----------------------------------------------------------------------


def test_a_35_minute_old_invalid_no_go_snapshot_is_stale_and_live_healthy_signals_win(
        ctx: Context, clock: FrozenClock) -> None:
    nogo = {"state": "NO_GO", "snapshotValid": False, "generatedAt": 0, "criteria": {
        "ops": {"consecutiveFailures": 2, "consecutivePasses": 0, "noGo": True}}}
    _write(ctx, state.HANDOFF, nogo)
    clock.advance(minutes=35)
    h = _status(ctx)["handoff"]
    assert h["stale"] is True and h["snapshotValid"] is True
    assert h["state"] == "GO" and h["snapshotState"] == "NO_GO"
    assert h["ageMs"] == 35 * 60 * 1000


def test_a_fresh_no_go_snapshot_is_not_stale_and_stands(ctx: Context, clock: FrozenClock
                                                        ) -> None:
    _write(ctx, state.HANDOFF, {"state": "NO_GO", "snapshotValid": False, "generatedAt": 0,
                                "criteria": {}})
    clock.advance(minutes=29)
    h = _status(ctx)["handoff"]
    assert h["stale"] is False and h["state"] == "NO_GO" and h["snapshotValid"] is False


def test_a_50_minute_old_critical_incident_reads_as_recovering_and_stale(
        ctx: Context, clock: FrozenClock) -> None:
    state.set_ops_incident(ctx, status="critical", reason="db down", actor="pager")
    clock.advance(minutes=40)
    inc = _status(ctx)["opsIncident"]
    assert inc["status"] == "critical" and inc["stale"] is False
    clock.advance(minutes=10)
    inc = _status(ctx)["opsIncident"]
    assert inc["status"] == "recovering" and inc["stale"] is True
    assert inc["writtenStatus"] == "critical" and inc["reason"] == "db down"
    # and the handoff ops criterion no longer fails on it
    assert handoff.run_handoff(ctx)["criteria"]["ops"]["failing"] is False


def test_an_ops_incident_needs_a_known_status(ctx: Context) -> None:
    for bad in ("on fire", "recovering", None, 3):
        with pytest.raises(InvalidInput):
            state.set_ops_incident(ctx, status=bad, reason="x")
    with pytest.raises(AutonomyError):
        state.set_ops_incident(ctx, status="ok", reason="x" * 100_000)
    assert _status(ctx)["opsIncident"]["neverSet"] is True


# --- run-locks in the status payload ---------------------------------------------------------


def test_run_locks_are_visible_in_status_while_a_job_runs(ctx: Context, clock: FrozenClock
                                                          ) -> None:
    token = locks.acquire(ctx, "self_heal", budget_ms=60_000, holder="host:42:celery-task")
    assert token
    clock.advance(seconds=75)
    wh = _status(ctx)["workflowHealth"]
    assert wh["runLocksCount"] == 1
    [lk] = wh["runLocks"]
    assert lk == {"job": "self_heal", "holder": "host:42:celery-task",
                  "startedAt": lk["startedAt"], "elapsedMs": 75_000, "budgetMs": 60_000,
                  "overBudget": True, "holderAlive": True}
    # a second run of the held job does nothing but say so
    skipped = jobs.run_job(ctx, "self_heal")
    assert skipped == {"ok": True, "job": "self_heal", "skipped": "already_running",
                       "holder": "host:42:celery-task", "elapsedMs": 75_000}
    with transaction(ctx.engine, write=False) as conn:
        [ev] = store.list_events(conn, kind="run_lock_skipped")
    assert ev["data"]["holder"] == "host:42:celery-task"
    assert _status(ctx)["workflowHealth"]["jobs"]["self_heal"]["skipped"] == "already_running"
    locks.release(ctx, "self_heal", token)
    assert _status(ctx)["workflowHealth"]["runLocks"] == []


# --- 4.5 handoff health -------------------------------------------------------------------------


def _boom(ctx: Context, _fence: state.Fence) -> dict[str, Any]:
    raise RuntimeError("the status job fell over")


def test_one_cron_error_is_still_go_and_two_in_a_row_are_no_go(
        ctx: Context, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(jobs.CHECKS, "status", _boom)
    with pytest.raises(RuntimeError):
        jobs.run_job(ctx, "status")
    first = handoff.run_handoff(ctx)
    assert first["criteria"]["cron"]["failing"] is True
    assert first["criteria"]["cron"]["consecutiveFailures"] == 1
    assert first["state"] == "GO"
    clock.advance(minutes=1)
    second = handoff.run_handoff(ctx)
    assert second["criteria"]["cron"]["consecutiveFailures"] == 2
    assert second["state"] == "NO_GO" and second["criteria"]["cron"]["noGo"] is True
    assert "status errored (RuntimeError)" in second["criteria"]["cron"]["detail"]
    # the job runs fine again: one passing run recovers (recovery_threshold = 1)
    monkeypatch.undo()
    jobs.run_job(ctx, "status")
    third = handoff.run_handoff(ctx)
    assert third["state"] == "GO" and third["criteria"]["cron"]["consecutivePasses"] == 1
    assert _status(ctx)["handoff"]["state"] == "GO"


def test_recovery_needs_recovery_threshold_passes(ctx: Context, clock: FrozenClock) -> None:
    ctx.settings = ctx.settings.model_copy(update={"recovery_threshold": 2})
    state.set_ops_incident(ctx, status="critical", reason="outage")
    assert handoff.run_handoff(ctx)["state"] == "GO"
    assert handoff.run_handoff(ctx)["state"] == "NO_GO"
    state.set_ops_incident(ctx, status="ok", reason="fixed")
    one = handoff.run_handoff(ctx)
    assert one["state"] == "NO_GO" and one["criteria"]["ops"]["consecutivePasses"] == 1
    two = handoff.run_handoff(ctx)
    assert two["state"] == "GO" and two["criteria"]["ops"]["noGo"] is False


def test_a_job_that_missed_its_schedule_fails_the_cron_criterion(
        ctx: Context, clock: FrozenClock) -> None:
    jobs.run_job(ctx, "self_heal")  # every 30 s; missed after 3 periods
    clock.advance(seconds=89)
    assert handoff.run_handoff(ctx)["criteria"]["cron"]["failing"] is False
    clock.advance(seconds=2)
    cron = handoff.run_handoff(ctx)["criteria"]["cron"]
    assert cron["failing"] is True and "self_heal missed its schedule" in cron["detail"]


def test_expired_leases_fail_the_queue_criterion_until_self_heal_requeues_them(
        ctx: Context, clock: FrozenClock) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    lanes.claim(ctx, assignee="coder", worker="w1")
    clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
    assert handoff.run_handoff(ctx)["criteria"]["queue"]["failing"] is True
    summary = jobs.run_job(ctx, "self_heal")
    assert summary["requeued"] == [tid]
    assert [lk["job"] for lk in summary["runningLocks"]] == ["self_heal"]
    assert handoff.run_handoff(ctx)["criteria"]["queue"]["failing"] is False
    assert _status(ctx)["selfHeal"]["requeued"] == [tid]


# --- 4.5 readiness ---------------------------------------------------------------------------


def _stall_after_a_completion(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="done one")
    got = lanes.claim(ctx, assignee="coder", worker="w1")
    lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                   outcome="success")
    lanes.create(ctx, assignee="coder", title="stuck")  # backlog that nobody takes


def test_a_single_45_minute_stall_is_not_sustained_and_seen_on_two_runs_it_is(
        ctx: Context, clock: FrozenClock) -> None:
    _stall_after_a_completion(ctx)
    clock.advance(minutes=46)
    first = readiness.run_readiness(ctx)
    assert first["stalled"] is True and first["sustainedBacklogStall"] is False
    assert first["prevBacklogSince"] is None and first["state"] == "GO"
    clock.advance(minutes=1)
    second = readiness.run_readiness(ctx)
    assert second["sustainedBacklogStall"] is True and second["state"] == "NO_GO"
    assert second["prevBacklogSince"] == first["backlogSince"]
    assert _status(ctx)["readiness"]["sustainedBacklogStall"] is True


def test_a_stall_seen_twice_but_shorter_than_45_minutes_is_not_sustained(
        ctx: Context, clock: FrozenClock) -> None:
    _stall_after_a_completion(ctx)
    clock.advance(minutes=10)
    readiness.run_readiness(ctx)
    clock.advance(minutes=10)
    r = readiness.run_readiness(ctx)
    assert r["stalled"] is True and r["sustainedBacklogStall"] is False


def test_progress_between_runs_resets_the_stall_clock(ctx: Context, clock: FrozenClock) -> None:
    _stall_after_a_completion(ctx)
    clock.advance(minutes=50)
    assert readiness.run_readiness(ctx)["stalled"] is True
    got = lanes.claim(ctx, assignee="coder", worker="w2")
    lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                   outcome="success")
    lanes.create(ctx, assignee="coder", title="next")
    clock.advance(minutes=1)
    r = readiness.run_readiness(ctx)
    assert r["stalled"] is False and r["sustainedBacklogStall"] is False


def test_one_ops_issue_is_not_sustained_and_two_in_a_row_are(ctx: Context) -> None:
    state.set_ops_incident(ctx, status="warning", reason="disk 90%")
    one = readiness.run_readiness(ctx)
    assert one["opsIssueConsecutive"] == 1 and one["sustainedOpsFailure"] is False
    assert one["state"] == "GO"
    two = readiness.run_readiness(ctx)
    assert two["opsIssueConsecutive"] == 2 and two["sustainedOpsFailure"] is True
    assert two["state"] == "NO_GO"
    state.set_ops_incident(ctx, status="ok", reason="cleaned up")
    three = readiness.run_readiness(ctx)
    assert three["opsIssueConsecutive"] == 0 and three["state"] == "GO"


def test_readiness_reads_the_handoff_snapshot_through_the_stale_rule(
        ctx: Context, clock: FrozenClock) -> None:
    _write(ctx, state.HANDOFF, {"state": "NO_GO", "snapshotValid": False, "generatedAt": 0,
                                "criteria": {}})
    assert readiness.run_readiness(ctx)["state"] == "NO_GO"
    clock.advance(minutes=31)
    assert readiness.run_readiness(ctx)["handoffState"] == "GO"


# --- self-heal ----------------------------------------------------------------------------------


def test_self_heal_releases_a_dead_holders_lock_and_leaves_a_slow_live_one(
        ctx: Context, clock: FrozenClock) -> None:
    locks.acquire(ctx, "readiness", budget_ms=1000, holder="gone:1:x")
    locks.acquire(ctx, "handoff_health", budget_ms=1000, holder="slow:2:y")
    clock.advance(seconds=30)
    ctx.redis.delete(ctx.keys.lock_beat("readiness"))  # its holder stopped beating
    summary = selfheal.run_self_heal(ctx)
    assert [b["job"] for b in summary["locksReleased"]] == ["readiness"]
    running = {lk["job"]: lk for lk in summary["runningLocks"]}
    assert running["handoff_health"]["overBudget"] is True
    assert running["handoff_health"]["holderAlive"] is True
    assert "readiness" not in running
    with transaction(ctx.engine, write=False) as conn:
        [ev] = store.list_events(conn, kind="run_lock_broken")
    assert ev["data"]["holder"] == "gone:1:x"
    assert jobs.run_job(ctx, "readiness")["ok"] is True  # the next run proceeds


def test_self_heal_breaks_its_own_dead_holders_lock_and_runs(ctx: Context, clock: FrozenClock
                                                           ) -> None:
    locks.acquire(ctx, "self_heal", budget_ms=60_000, holder="killed:1:self_heal")
    clock.advance(seconds=15)
    ctx.redis.delete(ctx.keys.lock_beat("self_heal"))  # the self-heal run was killed
    r = jobs.run_job(ctx, "self_heal")
    assert "skipped" not in r and r["ok"] is True  # not held off until the lock's TTL
    with transaction(ctx.engine, write=False) as conn:
        [ev] = store.list_events(conn, kind="run_lock_broken")
        assert store.list_events(conn, kind="run_lock_skipped") == []
    assert ev["data"] == {"job": "self_heal", "holder": "killed:1:self_heal",
                          "elapsedMs": 15_000, "budgetMs": 60_000}
    assert locks.collect_run_locks(ctx) == []  # released after the run


def test_self_heal_whose_own_holder_still_beats_is_skipped_and_left_alone(
        ctx: Context, clock: FrozenClock) -> None:
    token = locks.acquire(ctx, "self_heal", budget_ms=60_000, holder="slow:2:self_heal")
    clock.advance(seconds=90)  # over budget, but beating
    r = jobs.run_job(ctx, "self_heal")
    assert r["skipped"] == "already_running" and r["holder"] == "slow:2:self_heal"
    assert token is not None and locks.holds(ctx, "self_heal", token)
    with transaction(ctx.engine, write=False) as conn:
        assert store.list_events(conn, kind="run_lock_broken") == []


# --- corrupt state -------------------------------------------------------------------------------

CORRUPT = [
    pytest.param('{"state": "NO_', "invalid_json", id="truncated-json"),
    pytest.param('["not", "an", "object"]', "invalid_shape", id="not-an-object"),
    pytest.param('{"state": 7, "snapshotValid": "yes", "criteria": []}', "invalid_shape",
                 id="wrong-types"),
]


@pytest.mark.parametrize(("raw", "error"), CORRUPT)
def test_a_corrupt_handoff_snapshot_is_reported_and_the_checks_still_answer(
        ctx: Context, raw: str, error: str) -> None:
    _write_raw(ctx, state.HANDOFF, raw)
    h = _status(ctx)["handoff"]
    assert h["error"].startswith(error) and h["state"] is None
    r = handoff.run_handoff(ctx)  # starts its counters again, says why
    assert r["ok"] is True and r["previousStateError"].startswith(error)
    assert readiness.run_readiness(ctx)["ok"] is True
    assert _status(ctx)["handoff"]["error"] is None


@pytest.mark.parametrize(("raw", "error"), [
    *CORRUPT, pytest.param('{"status": "meltdown", "reason": null}', "invalid_shape",
                           id="unknown-status")])
def test_a_corrupt_incident_state_is_never_read_as_healthy(
        ctx: Context, raw: str, error: str) -> None:
    _write_raw(ctx, state.OPS_INCIDENT, raw)
    inc = _status(ctx)["opsIncident"]
    assert inc["error"].startswith(error) and inc["status"] is None
    h = handoff.run_handoff(ctx)
    assert h["criteria"]["ops"]["failing"] is True and h["snapshotValid"] is False
    assert readiness.run_readiness(ctx)["opsIssueConsecutive"] == 1


def test_a_state_written_in_the_future_is_reported_invalid(ctx: Context, clock: FrozenClock
                                                           ) -> None:
    future = clock.now.replace(year=clock.now.year + 1)
    _write(ctx, state.OPS_INCIDENT, {"status": "ok", "reason": None}, at=future)
    _write(ctx, state.READINESS, {"ranAt": 1, "backlogSince": 0}, at=future)
    _write(ctx, state.job_state_name("status"), {"lastStartedAt": 1, "ok": True}, at=future)
    st = _status(ctx)
    assert st["opsIncident"]["error"] == "future_timestamp"
    assert st["readiness"]["error"] == "future_timestamp"
    assert st["workflowHealth"]["jobs"]["status"]["stateError"] == "future_timestamp"
    cron = handoff.run_handoff(ctx)["criteria"]["cron"]
    assert cron["failing"] is True and "unreadable" in cron["detail"]


def test_a_missing_state_is_reported_as_missing_not_healthy(ctx: Context) -> None:
    st = _status(ctx)
    assert st["handoff"]["error"] == "missing" and st["handoff"]["state"] is None
    assert st["readiness"]["error"] == "missing" and st["readiness"]["state"] is None
    with transaction(ctx.engine, write=False) as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(check_state_table)
                            ).scalar_one() == 0


def test_check_state_is_written_with_its_time(ctx: Context, clock: FrozenClock) -> None:
    handoff.run_handoff(ctx)
    with transaction(ctx.engine, write=False) as conn:
        row = store.read_check_state(conn, name=state.HANDOFF)
    assert row is not None and row["written_at"] == clock.now


def test_an_unknown_job_is_refused(ctx: Context) -> None:
    with pytest.raises(InvalidInput):
        jobs.run_job(ctx, "rm_rf")


@pytest.mark.parametrize(("raw", "error"), CORRUPT)
def test_a_corrupt_snapshot_never_turns_a_failing_criterion_go(
        ctx: Context, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch, raw: str,
        error: str) -> None:
    """SPEC 4.7: NO_GO, then the snapshot is corrupted while the failure goes on. Before:
    the counters started from zero and the next run answered GO, with no trace. Now: NO_GO
    at once, and status and the audit trail say the state was recovered until a run
    completes on valid state."""
    monkeypatch.setitem(jobs.CHECKS, "status", _boom)
    with pytest.raises(RuntimeError):
        jobs.run_job(ctx, "status")
    handoff.run_handoff(ctx)
    assert handoff.run_handoff(ctx)["state"] == "NO_GO"
    _write_raw(ctx, state.HANDOFF, raw)
    clock.advance(minutes=1)
    after = handoff.run_handoff(ctx)
    assert after["state"] == "NO_GO" and after["criteria"]["cron"]["noGo"] is True
    assert after["previousStateError"].startswith(error) and after["stateRecoveredAt"]
    shown = _status(ctx)["handoff"]
    assert shown["state"] == "NO_GO" and shown["stateError"].startswith(error)
    assert shown["stateRecoveredAt"] == after["stateRecoveredAt"]
    with transaction(ctx.engine, write=False) as conn:
        [ev] = store.list_events(conn, kind="check_state_recovered")
    assert ev["reason"].startswith(error) and ev["data"]["verdict"] == "NO_GO"
    clock.advance(minutes=1)
    handoff.run_handoff(ctx)  # a run on valid state: the trace is no longer current
    assert _status(ctx)["handoff"]["stateRecoveredAt"] is None
