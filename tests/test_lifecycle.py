"""The task lifecycle (SPEC 4.11, issue 21): attempts and ``dead``, backoff, delayed tasks,
idempotent create, cancel, listing -- on SQLite and PostgreSQL against a real Redis, with a
frozen clock (time rules without sleeping)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from app.clock import FrozenClock, iso
from app.errors import (
    AutonomyError,
    InvalidInput,
    NotDead,
    TaskCancelled,
    TaskFinished,
    TaskNotFound,
)
from app.ops import breaker, lane_control, lanes, lifecycle
from app.settings import Settings
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.test_lanes import event_kinds, snapshot


def claim(ctx: Context, worker: str = "w1", lane: str = "coder") -> dict[str, Any]:
    return lanes.claim(ctx, assignee=lane, worker=worker)


def fail(ctx: Context, c: dict[str, Any], reason: str = "tests failed") -> dict[str, Any]:
    return lanes.complete(ctx, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                          outcome="failure", validation_reason=reason)


def row(ctx: Context, task_id: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        got = store.get_task(conn, task_id=task_id)
    assert got is not None
    return dict(got)


# --- backoff ------------------------------------------------------------------------------


def test_the_backoff_doubles_per_attempt_up_to_its_cap_within_its_jitter() -> None:
    def delay(attempts: int, r: float) -> float:
        return lifecycle.backoff_delay_s(attempts=attempts, base_s=2, cap_s=60, jitter=0.25,
                                         rand=lambda: r)

    assert [delay(n, 0.5) for n in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    assert delay(3, 0.0) == 16 * 0.75 and delay(3, 1.0) == 16 * 1.25
    assert delay(1000, 0.5) == 60  # no overflow however many attempts


def test_a_failed_task_is_claimable_again_only_after_its_backoff(
        ctx: Context, clock: FrozenClock) -> None:
    lane_control.configure_lane(ctx, assignee="coder", backoff_base_s=10, backoff_cap_s=100)
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    failed = fail(ctx, claim(ctx))
    assert failed["task"]["status"] == "todo" and failed["task"]["attempts"] == 1
    due = row(ctx, tid)["not_before"]
    jitter = ctx.settings.backoff_jitter
    assert clock() + timedelta(seconds=10 * (1 - jitter)) <= due \
        <= clock() + timedelta(seconds=10 * (1 + jitter))
    assert failed["task"]["notBefore"] == iso(due)
    assert claim(ctx) == {"ok": True, "task": None}  # not yet due: skipped
    clock.advance(seconds=(due - clock()).total_seconds() - 0.001)
    assert claim(ctx, "w2")["task"] is None
    clock.advance(seconds=0.001)
    again = claim(ctx, "w3")
    assert again["task"]["id"] == tid
    # the second failure waits twice as long
    fail(ctx, again)
    second = row(ctx, tid)["not_before"] - clock()
    assert timedelta(seconds=20 * (1 - jitter)) <= second <= timedelta(seconds=20 * (1 + jitter))


def test_a_task_not_yet_due_lets_the_next_due_one_be_claimed(
        ctx: Context, clock: FrozenClock) -> None:
    """The claim order skips what is not due instead of stopping at it (both claim paths)."""
    lane_control.configure_lane(ctx, assignee="coder", max_in_flight=2)
    late = lanes.create(ctx, assignee="coder", title="late", priority=9, delay_s=60)["task"]
    now = lanes.create(ctx, assignee="coder", title="now")["task"]
    assert claim(ctx)["task"]["id"] == now["id"]
    assert claim(ctx, "w2")["task"] is None
    clock.advance(seconds=60)
    assert claim(ctx, "w2")["task"]["id"] == late["id"]


# --- attempts and dead -----------------------------------------------------------------------


def test_at_max_attempts_a_failure_ends_the_task_dead_with_its_last_reason(
        ctx: Context, clock: FrozenClock) -> None:
    lane_control.configure_lane(ctx, assignee="coder", max_attempts=2, backoff_base_s=0)
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    first = fail(ctx, claim(ctx), "lint failed on line 3")
    assert first["task"]["status"] == "todo" and first["task"]["notBefore"] is None
    last = fail(ctx, claim(ctx), "build failed: 42 errors")
    assert last["task"]["status"] == "dead" and last["task"]["attempts"] == 2
    assert last["task"]["lastValidationReason"] == "build failed: 42 errors"
    assert last["fingerprintCount"] == 1  # the failure still counts for its fingerprint
    assert breaker.fingerprint_count(ctx, fingerprint=last["failureFingerprint"]) == 1
    assert claim(ctx) == {"ok": True, "task": None}
    assert event_kinds(ctx, tid)[-2:] == ["fingerprint_recorded", "task_dead"]


def test_the_breaker_still_trips_on_a_failure_that_kills_its_task(ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee="coder", max_attempts=1)
    for n in range(3):
        lanes.create(ctx, assignee="coder", title=f"t{n}")
    answers = [fail(ctx, claim(ctx), "same failure") for _ in range(3)]
    assert [a["task"]["status"] for a in answers] == ["dead"] * 3
    assert answers[-1]["lanePaused"] is True and answers[-1]["remediationTaskId"]


def test_the_default_max_attempts_is_a_setting(settings: Settings, clock: FrozenClock
                                               ) -> None:
    one = Context.from_settings(settings.model_copy(update={"default_max_attempts": 1}),
                                clock=clock)
    try:
        lanes.create(one, assignee="coder", title="t")
        assert fail(one, claim(one))["task"]["status"] == "dead"
    finally:
        one.close()


def test_requeue_brings_a_dead_task_back_with_its_attempts_reset_as_an_event(
        ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee="coder", max_attempts=1)
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    fail(ctx, claim(ctx))
    back = lifecycle.requeue(ctx, task_id=tid, actor="alice")
    assert back["task"]["status"] == "todo" and back["task"]["attempts"] == 0
    assert back["task"]["notBefore"] is None
    assert claim(ctx)["task"]["id"] == tid
    assert event_kinds(ctx, tid)[-2:] == ["task_requeued", "lease_granted"]
    with pytest.raises(NotDead):  # in progress now: only a dead task is requeued
        lifecycle.requeue(ctx, task_id=tid)
    assert event_kinds(ctx, tid)[-1] == "requeue_refused"
    with pytest.raises(TaskNotFound):
        lifecycle.requeue(ctx, task_id=999)


def test_lane_lifecycle_settings_are_shown_and_each_change_is_an_event(ctx: Context) -> None:
    lane = lane_control.configure_lane(ctx, assignee="coder", max_attempts=5,
                                       backoff_base_s=2, backoff_cap_s=30)["lane"]
    assert (lane["maxAttempts"], lane["backoffBaseS"], lane["backoffCapS"]) == (5, 2.0, 30.0)
    assert lane["maxInFlight"] == 1  # untouched
    with pytest.raises(InvalidInput):
        lane_control.configure_lane(ctx, assignee="coder")
    with pytest.raises(InvalidInput):
        lane_control.configure_lane(ctx, assignee="coder", max_attempts=0)
    with transaction(ctx.engine, write=False) as conn:
        ev = store.list_events(conn, assignee="coder", kind="lane_configured")[0]
    assert ev["data"] == {"maxAttempts": 5, "backoffBaseS": 2.0, "backoffCapS": 30.0}


# --- delayed tasks ----------------------------------------------------------------------------


def test_a_create_with_delay_s_or_not_before_is_claimable_only_from_then(
        ctx: Context, clock: FrozenClock) -> None:
    a = lanes.create(ctx, assignee="coder", title="a", delay_s=30)["task"]
    assert a["notBefore"] == iso(clock() + timedelta(seconds=30))
    at = clock() + timedelta(seconds=90)
    b = lanes.create(ctx, assignee="coder", title="b",
                     not_before=at.isoformat().replace("+00:00", "Z"))["task"]
    assert b["notBefore"] == iso(at)
    assert claim(ctx)["task"] is None
    clock.advance(seconds=30)
    got = claim(ctx)
    assert got["task"]["id"] == a["id"]
    lanes.complete(ctx, task_id=a["id"], lease_token=got["lease"]["token"], outcome="success")
    assert claim(ctx)["task"] is None
    clock.advance(seconds=60)
    assert claim(ctx)["task"]["id"] == b["id"]


@pytest.mark.parametrize("fields", [
    {"delay_s": 5, "not_before": "2030-01-01T00:00:00Z"},  # both
    {"not_before": "2030-01-01T00:00:00"},  # no zone
    {"not_before": "tomorrow"},
    {"delay_s": -1},
    {"delay_s": True},
    {"delay_s": 10**12},
])
def test_a_create_with_a_bad_delay_is_refused_and_writes_nothing(
        ctx: Context, fields: dict[str, Any]) -> None:
    before = snapshot(ctx)
    with pytest.raises(InvalidInput) as e:
        lanes.create(ctx, assignee="coder", title="t", **fields)
    assert e.value.details["field"] in ("delayS", "notBefore")
    assert snapshot(ctx) == before


def test_a_not_before_in_the_past_is_due_at_once(ctx: Context) -> None:
    t = lanes.create(ctx, assignee="coder", title="t",
                     not_before="2000-01-01T00:00:00+02:00")["task"]
    assert t["notBefore"] is None and claim(ctx)["task"]["id"] == t["id"]


# --- idempotent create ----------------------------------------------------------------------


def test_a_second_create_with_the_key_answers_the_first_task_and_writes_nothing(
        ctx: Context) -> None:
    first = lanes.create(ctx, assignee="coder", title="t", dedupe_key="pr-17")
    assert "guard" not in first and first["task"]["dedupeKey"] == "pr-17"
    before = snapshot(ctx)
    again = lanes.create(ctx, assignee="coder", title="other title", dedupe_key="pr-17")
    assert again["guard"] == "duplicate_create_guard"
    assert again["task"] == first["task"]
    assert snapshot(ctx) == before
    # another lane, or no key, is another task
    other = lanes.create(ctx, assignee="reviewer", title="t", dedupe_key="pr-17")
    assert "guard" not in other and other["task"]["id"] != first["task"]["id"]


def test_the_key_answers_its_task_after_it_finished_until_retention_prunes_it(
        ctx: Context) -> None:
    first = lanes.create(ctx, assignee="coder", title="t", dedupe_key="k")["task"]
    c = claim(ctx)
    lanes.complete(ctx, task_id=first["id"], lease_token=c["lease"]["token"],
                   outcome="success")
    again = lanes.create(ctx, assignee="coder", title="t", dedupe_key="k")
    assert again["guard"] == "duplicate_create_guard"
    assert again["task"]["id"] == first["id"] and again["task"]["status"] == "done"


def _race(n: int, make_ctx: Callable[[], Context], fn: Callable[[Context, int], Any]
          ) -> list[Any]:
    """``fn(ctx, i)`` in ``n`` threads released at once, each with a Context (engine,
    connections) of its own; answers what each returned or raised."""
    ctxs = [make_ctx() for _ in range(n)]
    gate = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn(ctxs[i], i)
        except AutonomyError as e:  # the verdict: every racer's answer
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in ctxs:
        c.close()
    return out


def test_sixteen_racing_creates_with_one_key_make_exactly_one_task(
        ctx: Context, settings: Settings, clock: FrozenClock) -> None:
    lanes.create(ctx, assignee="coder", title="lane exists")  # and one without the lane
    for lane in ("coder", "fresh"):
        answers = _race(16, lambda: Context.from_settings(settings, clock=clock),
                        lambda c, _, lane=lane: lanes.create(c, assignee=lane, title="t",
                                                             dedupe_key="race"))
        errors = [a for a in answers if isinstance(a, Exception)]
        assert errors == []
        made = [a for a in answers if "guard" not in a]
        assert len(made) == 1, answers
        assert {a["task"]["id"] for a in answers} == {made[0]["task"]["id"]}
        assert sum(a.get("guard") == "duplicate_create_guard" for a in answers) == 15
        with transaction(ctx.engine, write=False) as conn:
            n = conn.execute(sa.text("SELECT count(*) FROM task WHERE assignee = :a AND "
                                     "dedupe_key = 'race'"), {"a": lane}).scalar_one()
        assert n == 1
        assert event_kinds(ctx, made[0]["task"]["id"]) == ["task_created"]
        print(f"\n[dedupe race, lane {lane}] 16 creates with one key: tasks made 1, "
              f"answered duplicate_create_guard 15, rows with the key {n}, errors 0")


def test_a_bad_dedupe_key_is_refused(ctx: Context) -> None:
    for bad in ("", "   ", "k" * 201, 5, "a\x00b"):
        with pytest.raises(InvalidInput):
            lanes.create(ctx, assignee="coder", title="t", dedupe_key=bad)


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_ends_a_todo_task_and_a_second_cancel_says_so(ctx: Context) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    done = lifecycle.cancel(ctx, task_id=tid, actor="alice")
    assert done["task"]["status"] == "cancelled" and done["alreadyCancelled"] is False
    assert claim(ctx)["task"] is None
    assert lifecycle.cancel(ctx, task_id=tid)["alreadyCancelled"] is True
    assert event_kinds(ctx, tid) == ["task_created", "task_cancelled"]


def test_the_holder_of_a_cancelled_task_hears_task_cancelled_and_its_slot_is_free(
        ctx: Context) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    nxt = lanes.create(ctx, assignee="coder", title="next")["task"]["id"]
    c = claim(ctx)
    assert claim(ctx, "w2")["guard"] == "duplicate_claim_guard"  # max_in_flight 1
    lifecycle.cancel(ctx, task_id=tid)
    token = c["lease"]["token"]
    with pytest.raises(TaskCancelled):
        lanes.heartbeat(ctx, task_id=tid, lease_token=token)
    for outcome, reason in (("success", None), ("failure", "x")):
        with pytest.raises(TaskCancelled):
            lanes.complete(ctx, task_id=tid, lease_token=token, outcome=outcome,
                           validation_reason=reason)
    with pytest.raises(TaskCancelled):
        lanes.release(ctx, task_id=tid, lease_token=token)
    assert row(ctx, tid)["status"] == "cancelled"
    assert claim(ctx, "w2")["task"]["id"] == nxt  # the cancelled lease holds no slot
    kinds = event_kinds(ctx, tid)
    assert kinds[:3] == ["task_created", "lease_granted", "task_cancelled"]
    assert kinds.count("complete_refused") == 2 and "heartbeat_refused" in kinds


def test_a_finished_task_cannot_be_cancelled_and_the_refusal_is_an_event(
        ctx: Context) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    c = claim(ctx)
    lanes.complete(ctx, task_id=tid, lease_token=c["lease"]["token"], outcome="success")
    with pytest.raises(TaskFinished) as e:
        lifecycle.cancel(ctx, task_id=tid)
    assert e.value.http_status == 409 and e.value.code == "task_finished"
    assert event_kinds(ctx, tid)[-1] == "cancel_refused"
    assert row(ctx, tid)["status"] == "done"


def test_a_cancel_racing_a_complete_ends_exactly_one_way(
        ctx: Context, settings: Settings, clock: FrozenClock) -> None:
    """Twelve rounds, each a cancel and a complete released at once on connections of
    their own: the task ends ``done`` with the cancel refused, or ``cancelled`` with the
    complete refused -- never both, never neither -- and the events say which."""
    lane_control.configure_lane(ctx, assignee="coder", backoff_base_s=0)
    outcomes = set()
    ends: list[str] = []
    for _ in range(12):
        tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
        token = claim(ctx)["lease"]["token"]

        def act(c: Context, i: int, tid: int = tid, token: str = token) -> Any:
            if i == 0:
                return lifecycle.cancel(c, task_id=tid)
            return lanes.complete(c, task_id=tid, lease_token=token, outcome="success")

        answers = _race(2, lambda: Context.from_settings(settings, clock=clock), act)
        status = row(ctx, tid)["status"]
        kinds = event_kinds(ctx, tid)
        if status == "done":
            assert isinstance(answers[0], TaskFinished) and answers[1]["ok"] is True
            assert "task_cancelled" not in kinds and kinds[-1] == "cancel_refused"
        else:
            assert status == "cancelled", status
            assert isinstance(answers[1], TaskCancelled) and answers[0]["ok"] is True
            assert "task_completed" not in kinds and kinds[-1] == "complete_refused"
        outcomes.add(status)
        ends.append(status)
    assert outcomes <= {"done", "cancelled"}
    print(f"\n[cancel vs complete] 12 rounds: done {ends.count('done')}, cancelled "
          f"{ends.count('cancelled')}, both or neither 0")


def test_a_requeue_racing_claims_grants_the_task_at_most_once(
        ctx: Context, settings: Settings, clock: FrozenClock) -> None:
    """Twelve rounds: a dead task is requeued while three workers claim at the same
    instant, each on a connection of its own. A claim that ran before the requeue finds
    nothing; after it, exactly one claim is granted the task -- never two leases, and the
    events say requeued then (at most) one grant."""
    lane_control.configure_lane(ctx, assignee="coder", max_attempts=1, max_in_flight=3)
    granted_rounds = 0
    for n in range(12):
        tid = lanes.create(ctx, assignee="coder", title=f"t{n}")["task"]["id"]
        # a reason of its own each round: the breaker would pause the lane at 3 alike
        fail(ctx, claim(ctx, f"first-{n}"), reason=f"broke in step {chr(97 + n) * 3}")
        assert row(ctx, tid)["status"] == "dead"

        def act(c: Context, i: int, tid: int = tid, n: int = n) -> Any:
            if i == 0:
                return lifecycle.requeue(c, task_id=tid)
            return lanes.claim(c, assignee="coder", worker=f"w{i}-{n}")

        answers = _race(4, lambda: Context.from_settings(settings, clock=clock), act)
        assert answers[0]["ok"] is True, answers
        got = [a for a in answers[1:] if not isinstance(a, Exception)
               and (a.get("task") or {}).get("id") == tid and a.get("lease")]
        assert len(got) <= 1, answers
        kinds = event_kinds(ctx, tid)
        after = kinds[kinds.index("task_requeued"):]
        assert after.count("lease_granted") == len(got), kinds
        if got:
            granted_rounds += 1
            r = row(ctx, tid)
            assert r["status"] == "in_progress" and r["claimed_by"] == got[0]["task"]["claimedBy"]
            assert r["lease_token"] == got[0]["lease"]["token"]
        else:  # every claim ran before the requeue: the next one gets it, once
            assert claim(ctx, f"late-{n}")["task"]["id"] == tid
        lanes.complete(ctx, task_id=tid, lease_token=row(ctx, tid)["lease_token"],
                       outcome="success")
    print(f"\n[requeue vs claim] 12 rounds; granted inside the race: {granted_rounds}, "
          f"after it: {12 - granted_rounds}; double grants: 0")


def test_the_backoff_holds_after_redis_is_flushed(ctx: Context, clock: FrozenClock,
                                                  redis_server_url: str,
                                                  redis_prefix: str) -> None:
    """The database keeps ``not_before``: with every key of the deployment gone from Redis
    (a flush, a restart without persistence), a failed task is still not claimed before
    its backoff ends, by the worker that failed it or any other."""
    import redis

    lane_control.configure_lane(ctx, assignee="coder", backoff_base_s=30, backoff_cap_s=300)
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    fail(ctx, claim(ctx))
    due = row(ctx, tid)["not_before"]
    r = redis.Redis.from_url(redis_server_url)
    try:
        keys = list(r.scan_iter(match=redis_prefix + "*", count=1000))
        assert keys, "the fleet's keys were in Redis"
        r.delete(*keys)
    finally:
        r.close()
    assert claim(ctx, "w1") == {"ok": True, "task": None}
    assert claim(ctx, "w2") == {"ok": True, "task": None}
    clock.advance(seconds=(due - clock()).total_seconds())
    assert claim(ctx, "w2")["task"]["id"] == tid


# --- listing --------------------------------------------------------------------------------


def test_tasks_are_listed_newest_first_filtered_and_paged_by_keyset(ctx: Context) -> None:
    ids = [lanes.create(ctx, assignee="coder" if n % 2 else "reviewer",
                        title=f"t{n}")["task"]["id"] for n in range(7)]
    lifecycle.cancel(ctx, task_id=ids[1])
    every = lifecycle.list_tasks(ctx)
    assert [t["id"] for t in every["tasks"]] == ids[::-1] and every["nextAfter"] is None
    coder = [t["id"] for t in lifecycle.list_tasks(ctx, assignee="coder")["tasks"]]
    assert coder == [ids[5], ids[3], ids[1]]
    assert [t["id"] for t in lifecycle.list_tasks(ctx, status="cancelled")["tasks"]] \
        == [ids[1]]
    assert lifecycle.list_tasks(ctx, kind="ops_remediation")["tasks"] == []
    page1 = lifecycle.list_tasks(ctx, limit=3)
    assert [t["id"] for t in page1["tasks"]] == ids[6:3:-1] and page1["nextAfter"] == ids[4]
    lanes.create(ctx, assignee="coder", title="new")  # the pages do not shift
    page2 = lifecycle.list_tasks(ctx, limit=3, after=page1["nextAfter"])
    assert [t["id"] for t in page2["tasks"]] == ids[3:0:-1]
    page3 = lifecycle.list_tasks(ctx, limit=3, after=page2["nextAfter"])
    assert [t["id"] for t in page3["tasks"]] == [ids[0]] and page3["nextAfter"] is None
    for bad in ({"status": "sleeping"}, {"kind": "x"}, {"limit": 0}, {"limit": 501},
                {"after": 0}, {"assignee": "no spaces"}):
        with pytest.raises(InvalidInput):
            lifecycle.list_tasks(ctx, **bad)
