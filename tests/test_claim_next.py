"""``complete`` with ``claimNext``: a worker's cycle in one call (issue 13). The outcome is
recorded exactly as a plain complete records it, the next claim is exactly what ``claim``
would answer -- on PostgreSQL both in one statement -- and every refusal of that claim
leaves ``next`` out, so the worker claims as usual and hears why."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa

from app import ops
from app.errors import InvalidAssignee, InvalidInput, StaleLease
from app.ops import lane_control, lanes
from app.storage.context import Context
from app.storage.db import transaction
from app.workers.client import LocalClient
from app.workers.lane_worker import LaneWorker
from tests.api_server import client
from tests.test_lanes import event_kinds, snapshot

LANE = "coder"


def _next(worker: str = "w1", lane: str = LANE) -> dict[str, str]:
    return {"assignee": lane, "worker": worker}


def _statuses(ctx: Context) -> dict[int, tuple[str, str | None]]:
    with transaction(ctx.engine, write=False) as conn:
        rows = conn.execute(sa.text("SELECT id, status, claimed_by FROM task ORDER BY id"))
        return {r[0]: (r[1], r[2]) for r in rows}


def test_a_complete_hands_the_worker_its_next_lease(ctx: Context) -> None:
    t1, t2 = (lanes.create(ctx, assignee=LANE, title=f"t{i}")["task"]["id"] for i in (1, 2))
    got = lanes.claim(ctx, assignee=LANE, worker="w1")
    assert got["task"]["id"] == t1

    done = lanes.complete(ctx, task_id=t1, lease_token=got["lease"]["token"],
                          outcome="success", result={"ok": 1}, claim_next=_next())
    assert done["task"]["status"] == "done" and done["task"]["result"] == {"ok": 1}
    nxt = done["next"]
    assert nxt["task"]["id"] == t2 and nxt["task"]["claimedBy"] == "w1"
    assert len(nxt["lease"]["token"]) == 32 and "guard" not in nxt
    assert _statuses(ctx) == {t1: ("done", "w1"), t2: ("in_progress", "w1")}
    assert event_kinds(ctx, t1) == ["task_created", "lease_granted", "task_completed"]
    assert event_kinds(ctx, t2) == ["task_created", "lease_granted"]

    # the lease it handed over is a real one: fenced by its token like any other
    with pytest.raises(StaleLease):
        lanes.complete(ctx, task_id=t2, lease_token="f" * 32, outcome="success",
                       claim_next=_next())
    last = lanes.complete(ctx, task_id=t2, lease_token=nxt["lease"]["token"],
                          outcome="success", claim_next=_next())
    assert last["next"] == {"ok": True, "task": None}  # the lane is empty now
    assert _statuses(ctx) == {t1: ("done", "w1"), t2: ("done", "w1")}


def test_the_next_claim_keeps_the_lanes_max_in_flight(ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=2, actor="t")
    for i in range(4):
        lanes.create(ctx, assignee=LANE, title=f"t{i}")
    a = lanes.claim(ctx, assignee=LANE, worker="a")
    b = lanes.claim(ctx, assignee=LANE, worker="b")
    done = lanes.complete(ctx, task_id=a["task"]["id"], lease_token=a["lease"]["token"],
                          outcome="success", claim_next=_next("a"))
    assert done["next"]["lease"] is not None  # a's own slot, freed by its complete
    full = lanes.claim(ctx, assignee=LANE, worker="c")
    assert full["guard"] == "duplicate_claim_guard" and "lease" not in full
    live = [s for s, _ in _statuses(ctx).values() if s == "in_progress"]
    assert len(live) == 2 and b["lease"] is not None


def test_a_paused_lane_gets_the_outcome_recorded_and_no_next(ctx: Context) -> None:
    t1 = lanes.create(ctx, assignee=LANE, title="t1")["task"]["id"]
    lanes.create(ctx, assignee=LANE, title="t2")
    got = lanes.claim(ctx, assignee=LANE, worker="w1")
    lane_control.pause_lane(ctx, assignee=LANE, reason="maintenance", actor="ops")
    done = lanes.complete(ctx, task_id=t1, lease_token=got["lease"]["token"],
                          outcome="success", claim_next=_next())
    assert done["task"]["status"] == "done" and "next" not in done
    assert [s for s, _ in _statuses(ctx).values()] == ["done", "todo"]


def test_a_failure_records_the_breaker_fields_and_then_claims(ctx: Context) -> None:
    t1 = lanes.create(ctx, assignee=LANE, title="t1")["task"]["id"]
    lanes.create(ctx, assignee=LANE, title="t2")
    got = lanes.claim(ctx, assignee=LANE, worker="w1")
    failed = lanes.complete(ctx, task_id=t1, lease_token=got["lease"]["token"],
                            outcome="failure", validation_reason="no tests",
                            claim_next=_next())
    assert failed["failureFingerprint"] and failed["task"]["status"] == "todo"
    # the failed task is claimable again; claim order picks the older one: t1 itself
    assert failed["next"]["lease"] is not None


def test_a_refused_complete_grants_nothing(ctx: Context) -> None:
    t1 = lanes.create(ctx, assignee=LANE, title="t1")["task"]["id"]
    lanes.create(ctx, assignee=LANE, title="t2")
    lanes.claim(ctx, assignee=LANE, worker="w1")
    before = snapshot(ctx)
    with pytest.raises(StaleLease):
        lanes.complete(ctx, task_id=t1, lease_token="0" * 32, outcome="success",
                       claim_next=_next())
    assert snapshot(ctx) == before


@pytest.mark.parametrize(("claim_next", "error"), [
    ("coder", InvalidInput), ({"assignee": "bad lane!", "worker": "w1"}, InvalidAssignee),
    ({"assignee": LANE, "worker": "w\x00"}, InvalidInput), ({"assignee": LANE}, InvalidInput),
])
def test_a_bad_claim_next_is_refused_before_anything_is_written(
        ctx: Context, claim_next: Any, error: type[Exception]) -> None:
    t1 = lanes.create(ctx, assignee=LANE, title="t1")["task"]["id"]
    got = lanes.claim(ctx, assignee=LANE, worker="w1")
    before = snapshot(ctx)
    with pytest.raises(error):
        ops.dispatch(ctx, {"action": "complete", "taskId": t1, "outcome": "success",
                                "leaseToken": got["lease"]["token"], "claimNext": claim_next})
    assert snapshot(ctx) == before


def test_over_http_claim_next_answers_next(ctx: Context) -> None:
    t1, t2 = (lanes.create(ctx, assignee=LANE, title=f"t{i}")["task"]["id"] for i in (1, 2))
    got = lanes.claim(ctx, assignee=LANE, worker="w1")
    with client(ctx) as http:
        resp = http.post("/api/autonomy", json={
            "action": "complete", "taskId": t1, "leaseToken": got["lease"]["token"],
            "outcome": "success", "claimNext": _next()})
        bad = http.post("/api/autonomy", json={
            "action": "complete", "taskId": t2, "leaseToken": "0" * 32,
            "outcome": "success", "claimNext": {"assignee": LANE, "worker": 7}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["next"]["task"]["id"] == t2
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_worker"


def test_a_worker_stopping_gives_back_a_lease_it_was_handed(ctx: Context) -> None:
    """The stop lands after the complete that handed the next lease over: that task is
    not worked, and it is ``todo`` again at once (released), not left to expire."""
    ids = [lanes.create(ctx, assignee=LANE, title=f"t{i}")["task"]["id"] for i in range(3)]
    stop = threading.Event()

    class StopAfterComplete(LocalClient):
        def complete(self, *a: Any, **kw: Any) -> dict[str, Any]:
            answer = super().complete(*a, **kw)
            stop.set()
            return answer

    ran: list[int] = []
    worker = LaneWorker(LANE, lambda task: ran.append(task["id"]), worker_name="w1",
                        client=StopAfterComplete(ctx), say=lambda _line: None)
    worker.run(stop, handle_signals=False)
    assert ran == [ids[0]]
    assert _statuses(ctx) == {ids[0]: ("done", "w1"), ids[1]: ("todo", None),
                              ids[2]: ("todo", None)}
    assert event_kinds(ctx, ids[1]) == ["task_created", "lease_granted", "lease_released"]
    assert worker.stats.released == 1


def test_a_worker_runs_each_task_once_on_handed_over_leases(ctx: Context) -> None:
    ids = [lanes.create(ctx, assignee=LANE, title=f"t{i}")["task"]["id"] for i in range(6)]
    ran: list[int] = []
    calls: list[str] = []

    class Counting(LocalClient):
        def call(self, request: dict[str, Any]) -> dict[str, Any]:
            calls.append(request["action"])
            return super().call(request)

    worker = LaneWorker(LANE, lambda task: ran.append(task["id"]), worker_name="w1",
                        client=Counting(ctx), say=lambda _line: None)
    worker.run(threading.Event(), max_tasks=6, handle_signals=False)
    assert ran == ids
    assert {s for s, _ in _statuses(ctx).values()} == {"done"}
    # one claim to start, then each complete brings the next lease: no claim per task
    assert calls == ["claim"] + ["complete"] * 6
