"""Answers that say what happened (issue 23 item 7): a resume says whether it lifted a
pause, a late outcome says whether its lease was released or expired, ``attempts`` counts
failures everywhere (API, worker log, CLI), and the status's fingerprint counts are the
breaker's own (since the lane's resume)."""

from __future__ import annotations

from typing import Any

import pytest

from app import ops
from app.api import metrics
from app.cli.output import table
from app.clock import FrozenClock
from app.errors import NotInProgress, StaleLease
from app.ops import lane_control, lanes
from app.settings import Settings
from app.storage.context import Context
from app.workers.client import LocalClient
from app.workers.lane_worker import LaneWorker, ValidationFailed
from tests.conftest import make_settings


@pytest.fixture
def settings(database_url: str, redis_server_url: str, redis_prefix: str) -> Settings:
    """No backoff: a failed task is claimable again at once."""
    return make_settings(database_url, redis_server_url, redis_prefix, backoff_base_s=0)


def _fail_next(ctx: Context, reason: str, lane: str = "coder") -> dict[str, Any]:
    c = lanes.claim(ctx, assignee=lane, worker="w1")
    assert c["task"] is not None and "guard" not in c, c
    return lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                          outcome="failure", validation_reason=reason)


def test_resume_answers_whether_it_lifted_a_pause_and_keeps_already_running(
        ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="t")
    lane_control.pause_lane(ctx, assignee="coder", reason="freeze", actor="alice")
    first = lane_control.resume_lane(ctx, assignee="coder", actor="alice")
    again = lane_control.resume_lane(ctx, assignee="coder", actor="alice")
    never = lane_control.resume_lane(ctx, assignee="no-such-lane", actor="alice")
    assert first["wasPaused"] is True and again["wasPaused"] is False
    assert never["wasPaused"] is False and never["lane"] is None
    # the old field stays, its negation, for clients written against it
    assert [a["alreadyRunning"] for a in (first, again, never)] == [False, True, True]


def test_a_late_complete_after_a_release_says_the_lease_was_released(ctx: Context) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    old = lanes.claim(ctx, assignee="coder", worker="w1")["lease"]["token"]
    lanes.release(ctx, task_id=tid, lease_token=old)
    with pytest.raises(NotInProgress, match="this lease was released at"):
        lanes.complete(ctx, task_id=tid, lease_token=old, outcome="success")
    assert lanes.claim(ctx, assignee="coder", worker="w2")["task"]["id"] == tid
    with pytest.raises(StaleLease) as late:
        lanes.complete(ctx, task_id=tid, lease_token=old, outcome="success")
    assert "released at" in late.value.message and "expired" not in late.value.message
    assert late.value.to_wire()["leaseEnded"] == "released"
    with pytest.raises(StaleLease, match="released at"):
        lanes.heartbeat(ctx, task_id=tid, lease_token=old)


def test_a_late_complete_after_an_expiry_still_says_it_expired(ctx: Context,
                                                               clock: FrozenClock) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    old = lanes.claim(ctx, assignee="coder", worker="w1")["lease"]["token"]
    clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
    assert lanes.claim(ctx, assignee="coder", worker="w2")["task"]["id"] == tid
    with pytest.raises(StaleLease) as late:
        lanes.complete(ctx, task_id=tid, lease_token=old, outcome="success")
    assert "expired" in late.value.message
    assert late.value.to_wire()["leaseEnded"] == "expired"


def test_attempts_count_failures_and_the_worker_log_says_the_same(ctx: Context) -> None:
    """A task done on its first claim shows ``attempts: 0``, and the worker logged
    "0 failures so far" for it -- not "attempt 1"."""
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    lines: list[str] = []
    tries: list[int] = []

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        tries.append(task["attempts"])
        if len(tries) == 1:
            raise ValidationFailed("flaky")
        return {}

    LaneWorker("coder", handler, worker_name="w1", client=LocalClient(ctx),
               say=lines.append, idle_backoff_s=(0.01, 0.05)).run(max_tasks=2)
    claimed = [ln for ln in lines if ": claimed" in ln]
    assert tries == [0, 1]
    assert [ln.split(": ")[-1] for ln in claimed] == [
        "claimed (0 failures so far)", "claimed (1 failure so far)"]
    done = ops.dispatch(ctx, {"action": "tasks", "assignee": "coder"})["tasks"][0]
    assert done["id"] == tid and done["status"] == "done" and done["attempts"] == 1
    assert table([done], ["id", "attempts"]).splitlines()[0].split() == ["ID", "FAILURES"]


def test_status_counts_fingerprints_as_the_breaker_does_since_the_resume(
        ctx: Context, clock: FrozenClock) -> None:
    """After a trip (3/3) and a resume, two more failures: the breaker counts 2, and so
    does the status (the panel's card), not the window's 5."""
    for _ in range(5):
        lanes.create(ctx, assignee="coder", title="t")
    for _ in range(3):
        _fail_next(ctx, "same")
    clock.advance(minutes=5)
    lane_control.resume_lane(ctx, assignee="coder", actor="alice")
    clock.advance(minutes=1)
    _fail_next(ctx, "same")
    answer = _fail_next(ctx, "same")
    assert answer["fingerprintCount"] == 2
    status = ops.dispatch(ctx, {"action": "status"})
    fp = status["fingerprints"][0]
    assert fp["fingerprint"] == "coder:same"
    assert (fp["count"], fp["windowCount"], fp["sinceResume"]) == (2, 5, True)
    assert fp["countSince"] is not None
    text = metrics.render(status).decode()
    assert 'autonomy_breaker_top_fingerprint_failures{lane="coder"} 2.0' in text
