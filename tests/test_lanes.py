"""Claim, heartbeat, complete and release: the change log's before/after rows and fencing,
on SQLite and PostgreSQL against a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from app.clock import FrozenClock
from app.errors import LanePaused, NotInProgress, StaleLease, TaskNotFound
from app.ops import lane_control, lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction


def snapshot(ctx: Context) -> list[dict[str, Any]]:
    """Every task row and lane row, for "nothing was written" assertions."""
    with transaction(ctx.engine, write=False) as conn:
        tasks = [dict(r) for r in conn.execute(sa.text("SELECT * FROM task ORDER BY id"))
                 .mappings()]
        lanes_ = [dict(r) for r in conn.execute(sa.text("SELECT * FROM lane ORDER BY assignee"))
                  .mappings()]
    return tasks + lanes_


def event_kinds(ctx: Context, task_id: int) -> list[str]:
    with transaction(ctx.engine, write=False) as conn:
        return [e["kind"] for e in reversed(store.list_events(conn, task_id=task_id))]


def test_claim_grants_a_lease_on_the_highest_priority_then_oldest_task(ctx: Context,
                                                                       clock: FrozenClock) -> None:
    lanes.create(ctx, assignee="coder", title="old low")
    clock.advance(seconds=1)
    high = lanes.create(ctx, assignee="coder", title="new high", priority=5)["task"]
    answer = lanes.claim(ctx, assignee="coder", worker="w1")
    assert answer["ok"] is True and "guard" not in answer
    assert answer["task"]["id"] == high["id"]
    assert answer["task"]["status"] == "in_progress"
    assert answer["task"]["claimedBy"] == "w1"
    assert len(answer["lease"]["token"]) == 32
    assert answer["lease"]["expiresAt"] == answer["task"]["leaseExpiresAt"]
    assert "lease_token" not in answer["task"] and "leaseToken" not in answer["task"]


def test_claim_on_an_empty_or_unknown_lane_answers_no_task(ctx: Context) -> None:
    assert lanes.claim(ctx, assignee="nobody", worker="w1") == {"ok": True, "task": None}
    lanes.create(ctx, assignee="coder", title="t")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    lanes.complete(ctx, task_id=first["task"]["id"], lease_token=first["lease"]["token"],
                   outcome="success")
    assert lanes.claim(ctx, assignee="coder", worker="w1") == {"ok": True, "task": None}


def test_second_claim_while_the_lease_is_live_is_guarded_and_writes_nothing(ctx: Context) -> None:
    """Before: a second claim overwrote the lease. After: duplicate_claim_guard, no write."""
    lanes.create(ctx, assignee="coder", title="a")
    lanes.create(ctx, assignee="coder", title="b")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    before = snapshot(ctx)
    second = lanes.claim(ctx, assignee="coder", worker="w2")
    assert second["ok"] is True
    assert second["guard"] == "duplicate_claim_guard"
    assert second["task"]["id"] == first["task"]["id"]
    assert second["leaseHolder"] == "w1"
    assert second["leaseExpiresAt"] == first["lease"]["expiresAt"]
    assert "lease" not in second  # only the holder ever sees the token
    assert snapshot(ctx) == before
    assert event_kinds(ctx, first["task"]["id"]) == ["task_created", "lease_granted"]


def test_the_same_worker_claiming_again_gets_its_own_lease_back(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    again = lanes.claim(ctx, assignee="coder", worker="w1")
    assert again["guard"] == "duplicate_claim_guard"
    assert again["lease"] == first["lease"]


def test_claim_guard_holds_after_redis_is_flushed(ctx: Context) -> None:
    """The database layer alone prevents the double claim."""
    lanes.create(ctx, assignee="coder", title="a")
    lanes.create(ctx, assignee="coder", title="b")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    for key in ctx.redis.scan_iter(match=ctx.settings.redis_prefix + "*"):
        ctx.redis.delete(key)
    before = snapshot(ctx)
    second = lanes.claim(ctx, assignee="coder", worker="w2")
    assert second["guard"] == "duplicate_claim_guard"
    assert second["task"]["id"] == first["task"]["id"]
    assert snapshot(ctx) == before


def test_guard_hits_are_in_the_lane_history_without_a_database_write(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    lanes.claim(ctx, assignee="coder", worker="w2")
    from app.ops.history import history

    events = history(ctx, task_id=first["task"]["id"])["events"]
    guards = [e for e in events if e["kind"] == "claim_guard"]
    assert len(guards) == 1
    assert guards[0]["actor"] == "w2" and guards[0]["data"]["leaseHolder"] == "w1"


def test_a_lane_allows_max_in_flight_leases_then_guards(ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee="coder", max_in_flight=2)
    for i in range(3):
        lanes.create(ctx, assignee="coder", title=f"t{i}")
    a = lanes.claim(ctx, assignee="coder", worker="w1")
    b = lanes.claim(ctx, assignee="coder", worker="w2")
    c = lanes.claim(ctx, assignee="coder", worker="w3")
    assert "guard" not in a and "guard" not in b
    assert a["task"]["id"] != b["task"]["id"]
    assert c["guard"] == "duplicate_claim_guard"


def test_second_complete_is_answered_ok_with_a_guard_and_writes_nothing(ctx: Context) -> None:
    """Before: the second complete errored not_in_progress. After: ok + guard."""
    lanes.create(ctx, assignee="coder", title="a")
    c = lanes.claim(ctx, assignee="coder", worker="w1")
    done = lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                          outcome="success", result={"pr": 7})
    assert done["task"]["status"] == "done" and done["task"]["result"] == {"pr": 7}
    before = snapshot(ctx)
    again = lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                           outcome="success")
    assert again["ok"] is True and again["guard"] == "duplicate_complete_guard"
    assert again["task"]["status"] == "done"
    assert snapshot(ctx) == before


def test_an_expired_lease_is_claimable_and_the_late_complete_is_fenced(ctx: Context,
                                                                        clock: FrozenClock) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
    second = lanes.claim(ctx, assignee="coder", worker="w2")
    assert "guard" not in second
    assert second["task"]["id"] == first["task"]["id"]
    assert second["lease"]["token"] != first["lease"]["token"]
    before = snapshot(ctx)
    with pytest.raises(StaleLease) as err:
        lanes.complete(ctx, task_id=first["task"]["id"], lease_token=first["lease"]["token"],
                       outcome="success")
    assert err.value.code == "stale_lease"
    assert snapshot(ctx) == before
    with pytest.raises(StaleLease):
        lanes.heartbeat(ctx, task_id=first["task"]["id"], lease_token=first["lease"]["token"])
    kinds = event_kinds(ctx, first["task"]["id"])
    assert kinds == ["task_created", "lease_granted", "lease_requeued", "lease_granted",
                     "complete_refused", "heartbeat_refused"]
    ok = lanes.complete(ctx, task_id=second["task"]["id"], lease_token=second["lease"]["token"],
                        outcome="success")
    assert ok["task"]["status"] == "done" and ok["task"]["claimedBy"] == "w2"


def test_a_late_complete_from_a_superseded_lease_on_a_done_task_is_stale_lease(
        ctx: Context, clock: FrozenClock) -> None:
    """SPEC 4.2: the task is done under w2's lease; w1's late complete (its lease expired)
    is refused with stale_lease, writes nothing but an event; w2's retry stays the
    idempotent duplicate_complete_guard."""
    lanes.create(ctx, assignee="coder", title="a")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
    second = lanes.claim(ctx, assignee="coder", worker="w2")
    tid = second["task"]["id"]
    lanes.complete(ctx, task_id=tid, lease_token=second["lease"]["token"], outcome="success")
    before = snapshot(ctx)
    for outcome in ("success", "failure"):
        with pytest.raises(StaleLease) as err:
            lanes.complete(ctx, task_id=tid, lease_token=first["lease"]["token"],
                           outcome=outcome, validation_reason="late")
        assert err.value.details["status"] == "done"
    assert snapshot(ctx) == before
    again = lanes.complete(ctx, task_id=tid, lease_token=second["lease"]["token"],
                           outcome="success")
    assert again["guard"] == "duplicate_complete_guard"
    assert snapshot(ctx) == before
    with transaction(ctx.engine, write=False) as conn:
        refused = [e for e in store.list_events(conn, task_id=tid)
                   if e["kind"] == "complete_refused"]
    assert [e["reason"] for e in refused] == ["stale_lease", "stale_lease"]


def test_heartbeat_extends_a_live_lease(ctx: Context, clock: FrozenClock) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    c = lanes.claim(ctx, assignee="coder", worker="w1")
    clock.advance(seconds=ctx.settings.lease_ttl_s - 1)
    hb = lanes.heartbeat(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"])
    assert hb["lease"]["expiresAt"] > c["lease"]["expiresAt"]
    clock.advance(seconds=10)  # past the first expiry, inside the extended one
    other = lanes.claim(ctx, assignee="coder", worker="w2")
    assert other["guard"] == "duplicate_claim_guard"


def test_complete_of_a_todo_task_is_refused_not_in_progress(ctx: Context) -> None:
    t = lanes.create(ctx, assignee="coder", title="a")["task"]
    with pytest.raises(NotInProgress) as err:
        lanes.complete(ctx, task_id=t["id"], lease_token="0" * 32, outcome="success")
    assert err.value.to_wire()["error"] == "not_in_progress"


def test_complete_of_an_unknown_task_is_task_not_found(ctx: Context) -> None:
    with pytest.raises(TaskNotFound):
        lanes.complete(ctx, task_id=999, lease_token="0" * 32, outcome="success")


def test_release_returns_the_task_to_todo_at_once(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    c = lanes.claim(ctx, assignee="coder", worker="w1")
    lanes.release(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"])
    again = lanes.claim(ctx, assignee="coder", worker="w2")
    assert again["task"]["id"] == c["task"]["id"] and "guard" not in again


def test_claim_on_a_paused_lane_is_refused_with_reason_and_time(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    lane_control.pause_lane(ctx, assignee="coder", reason="deploy freeze", actor="alice")
    before = snapshot(ctx)
    with pytest.raises(LanePaused) as err:
        lanes.claim(ctx, assignee="coder", worker="w1")
    wire = err.value.to_wire()
    assert wire["error"] == "lane_paused" and wire["reason"] == "deploy freeze"
    assert wire["pausedAt"] is not None
    assert snapshot(ctx) == before


def test_paused_lane_is_refused_even_when_redis_forgot_the_pause(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    lane_control.pause_lane(ctx, assignee="coder", reason="freeze")
    ctx.redis.delete(ctx.keys.lane_meta("coder"))
    with pytest.raises(LanePaused):
        lanes.claim(ctx, assignee="coder", worker="w1")


def test_a_stale_redis_pause_does_not_block_a_resumed_lane(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="a")
    ctx.redis.hset(ctx.keys.lane_meta("coder"), mapping={"paused": "1", "reason": "stale"})
    assert lanes.claim(ctx, assignee="coder", worker="w1")["task"] is not None
