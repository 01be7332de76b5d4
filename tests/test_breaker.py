"""The failure fingerprint breaker and pause/resume: same failure 3x in 24 h pauses the
lane and files one ops remediation task; resume starts the count afresh."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.clock import FrozenClock
from app.errors import LanePaused
from app.ops import breaker, lane_control, lanes
from app.ops.history import history
from app.settings import Settings
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.conftest import make_settings


@pytest.fixture
def settings(database_url: str, redis_server_url: str, redis_prefix: str) -> Settings:
    """The breaker counts failures, not time: here a failed task is claimable again at
    once (no backoff; ``tests/test_lifecycle.py`` is about the backoff)."""
    return make_settings(database_url, redis_server_url, redis_prefix, backoff_base_s=0)


def fail_next(ctx: Context, reason: str, lane: str = "coder", worker: str = "w1"
              ) -> dict[str, Any]:
    c = lanes.claim(ctx, assignee=lane, worker=worker)
    assert c["task"] is not None and "guard" not in c, c
    return lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                          outcome="failure", validation_reason=reason)


def remediation_tasks(ctx: Context) -> list[Any]:
    with transaction(ctx.engine, write=False) as conn:
        return [t for t in store.list_tasks(conn, assignee="ops")
                if t["kind"] == "ops_remediation"]


def test_normalisation_groups_failures_that_differ_only_in_volatile_parts() -> None:
    a = breaker.fingerprint("coder", "  Test 42 failed: build 9f8e7d6c5b at 2026-01-01  ")
    b = breaker.fingerprint("coder", "test 7 FAILED: build 0a1b2c3d4e at 2025-12-31")
    assert a == b == "coder:test <n> failed: build <hash> at <n>-<n>-<n>"
    uid = breaker.normalise_reason("job 123e4567-e89b-12d3-a456-426614174000 missing")
    assert uid == "job <id> missing"
    assert breaker.fingerprint("coder", "lint failed") != breaker.fingerprint("coder",
                                                                              "tests failed")
    assert breaker.fingerprint("coder", "x") != breaker.fingerprint("reviewer", "x")


@given(st.text(max_size=500))
def test_normalisation_is_idempotent_and_bounded(reason: str) -> None:
    once = breaker.normalise_reason(reason)
    assert breaker.normalise_reason(once) == once
    assert len(once) <= breaker.MAX_REASON_IN_FINGERPRINT


def test_a_failure_returns_the_task_to_todo_with_its_fingerprint(ctx: Context) -> None:
    t = lanes.create(ctx, assignee="coder", title="a")["task"]
    answer = fail_next(ctx, "Tests 3 failed")
    assert answer["ok"] is True
    assert answer["failureFingerprint"] == "coder:tests <n> failed"
    assert answer["fingerprintCount"] == 1 and answer["lanePaused"] is False
    assert "remediationTaskId" not in answer
    assert answer["task"]["id"] == t["id"]
    assert answer["task"]["status"] == "todo" and answer["task"]["attempts"] == 1
    assert answer["task"]["lastValidationReason"] == "Tests 3 failed"
    assert answer["task"]["claimedBy"] is None


def test_three_identical_failures_in_24h_pause_the_lane_and_file_one_remediation(
        ctx: Context, clock: FrozenClock) -> None:
    """Before: infinite retry. After: lane paused, ops task created, claim -> lane_paused."""
    tasks = [lanes.create(ctx, assignee="coder", title=f"t{i}", priority=-i)["task"]
             for i in range(4)]
    answers = []
    for _ in range(3):
        answers.append(fail_next(ctx, "schema check failed"))
        clock.advance(hours=1)
    assert [a["fingerprintCount"] for a in answers] == [1, 2, 3]
    tripped = answers[-1]
    assert tripped["lanePaused"] is True
    assert isinstance(tripped["remediationTaskId"], int)
    fp = tripped["failureFingerprint"]

    ops = remediation_tasks(ctx)
    assert len(ops) == 1
    assert ops[0]["id"] == tripped["remediationTaskId"]
    assert ops[0]["payload"]["fingerprint"] == fp
    assert ops[0]["payload"]["count"] == 3
    assert ops[0]["payload"]["taskIds"] == [tasks[0]["id"]]

    with pytest.raises(LanePaused) as err:
        lanes.claim(ctx, assignee="coder", worker="w9")
    assert "breaker" in err.value.to_wire()["reason"]
    with transaction(ctx.engine, write=False) as conn:
        active = [t for t in store.list_tasks(conn, assignee="coder")]
    assert active and all(t["lane_paused"] for t in active)
    assert breaker.fingerprint_count(ctx, fingerprint=fp) == 3


def test_failures_outside_the_window_do_not_count(ctx: Context, clock: FrozenClock) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    fail_next(ctx, "flaky")
    fail_next(ctx, "flaky")
    clock.advance(hours=24, seconds=1)
    answer = fail_next(ctx, "flaky")
    assert answer["fingerprintCount"] == 1 and answer["lanePaused"] is False
    assert breaker.fingerprint_count(ctx, fingerprint=answer["failureFingerprint"],
                                     window_hours=48) == 3


def test_different_failures_do_not_trip_the_breaker(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    for reason in ("lint failed", "tests failed", "build failed", "lint failed"):
        assert fail_next(ctx, reason)["lanePaused"] is False


def test_resume_lets_claims_work_again_and_restarts_the_count(ctx: Context,
                                                               clock: FrozenClock) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    for _ in range(3):
        fail_next(ctx, "same")
    with pytest.raises(LanePaused):
        lanes.claim(ctx, assignee="coder", worker="w1")
    clock.advance(minutes=5)
    resumed = lane_control.resume_lane(ctx, assignee="coder", actor="alice")
    assert resumed["lane"]["paused"] is False and resumed["alreadyRunning"] is False
    answer = fail_next(ctx, "same")
    assert answer["fingerprintCount"] == 1 and answer["lanePaused"] is False
    fail_next(ctx, "same")
    tripped = fail_next(ctx, "same")
    assert tripped["lanePaused"] is True
    # the first remediation task is still open: no second one for the same fingerprint
    assert len(remediation_tasks(ctx)) == 1
    assert tripped["remediationTaskId"] == remediation_tasks(ctx)[0]["id"]


def test_pause_and_resume_are_idempotent_and_audited(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    p1 = lane_control.pause_lane(ctx, assignee="coder", reason="freeze", actor="alice")
    p2 = lane_control.pause_lane(ctx, assignee="coder", reason="other", actor="bob")
    assert p1["alreadyPaused"] is False and p2["alreadyPaused"] is True
    assert p2["lane"]["pausedReason"] == "freeze"
    created = lanes.create(ctx, assignee="coder", title="during pause")["task"]
    assert created["lanePaused"] is True and created["lanePausedReason"] == "freeze"
    r1 = lane_control.resume_lane(ctx, assignee="coder", actor="carol")
    r2 = lane_control.resume_lane(ctx, assignee="coder", actor="carol")
    assert r1["alreadyRunning"] is False and r2["alreadyRunning"] is True
    kinds = [(e["kind"], e["actor"]) for e in history(ctx, assignee="coder")["events"]
             if e["kind"] in ("lane_paused", "lane_resumed")]
    assert kinds == [("lane_resumed", "carol"), ("lane_paused", "alice")]
    with transaction(ctx.engine, write=False) as conn:
        assert not any(t["lane_paused"] for t in store.list_tasks(conn, assignee="coder"))


def test_history_explains_why_a_lane_is_paused(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    for _ in range(3):
        fail_next(ctx, "same")
    events = history(ctx, assignee="coder")["events"]
    paused = [e for e in events if e["kind"] == "lane_paused"]
    assert len(paused) == 1 and paused[0]["actor"] == "breaker"
    assert paused[0]["data"]["count"] == 3
    assert sum(e["kind"] == "fingerprint_recorded" for e in events) == 3
