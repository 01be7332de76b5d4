"""Push pickup with one blocked wait per process (``app.storage.pickup_hub``, issue 22):
the guarantees of the per-waiter wait it replaced -- a wake no waiter here took reaches
another process, a task that came without a wake is found by the lane's safety poll and
that poll's lead passes on when its process goes, and a Redis that dies under the waiters
sends them to PostgreSQL NOTIFY."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from app.ops import lane_control, lanes
from app.storage import pickup
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis

LANE = "hub"


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _claim_in_thread(ctx: Context, worker: str, wait_ms: int
                     ) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        box["answer"] = lanes.claim(ctx, assignee=LANE, worker=worker, wait_ms=wait_ms)
        box["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.mark.postgres
def test_a_wake_popped_where_nobody_waits_any_more_reaches_another_process(
        pg_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """Process A's last waiter left, but its blocked wait still covers the lane (A's
    worker is between two claims) and pops the wake: no waiter of A takes it, so A pushes
    it back and process B's waiter claims -- at once, not at a safety poll (a minute)."""
    s = make_settings(pg_url, redis_server_url, redis_prefix, pickup_safety_poll_ms=60_000)
    a, b, producer = (Context.from_settings(s) for _ in range(3))
    try:
        lane_control.configure_lane(producer, assignee=LANE, max_in_flight=5, actor="t")
        producer.redis.set(producer.keys.lane_poll(LANE), "another", px=60_000)
        assert lanes.claim(a, assignee=LANE, worker="a1", wait_ms=100)["task"] is None
        t, box = _claim_in_thread(b, "b1", 20_000)
        _until(lambda: pickup.waiting(b, assignee=LANE) == 1, "B's claim to wait")
        made = time.monotonic()
        task = lanes.create(producer, assignee=LANE, title="to b")["task"]
        t.join(30)
        assert box["answer"]["task"]["id"] == task["id"]
        assert box["at"] - made < 10
    finally:
        for c in (a, b, producer):
            c.close()


@pytest.mark.postgres
def test_a_task_without_a_wake_is_found_by_the_safety_poll(
        pg_url: str, redis_server_url: str, redis_prefix: str) -> None:
    s = make_settings(pg_url, redis_server_url, redis_prefix, pickup_safety_poll_ms=300)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    try:
        lane_control.configure_lane(producer, assignee=LANE, max_in_flight=5, actor="t")
        task = lanes.create(producer, assignee=LANE, title="no wake")["task"]
        producer.redis.delete(producer.keys.lane_wake(LANE))  # the wake was lost
        answer = lanes.claim(waiter, assignee=LANE, worker="w1", wait_ms=20_000)
        assert answer["task"]["id"] == task["id"]
    finally:
        waiter.close()
        producer.close()


@pytest.mark.postgres
def test_the_safety_polls_lead_passes_on_when_its_process_dies(
        pg_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """The leader's key outlives its process (killed: nobody let go of it); another
    process takes the lead once it expires (3 x ``pickup_block_s``) and its poll finds a
    task that came without a wake."""
    s = make_settings(pg_url, redis_server_url, redis_prefix, pickup_safety_poll_ms=200,
                      pickup_block_s=0.5)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    try:
        lane_control.configure_lane(producer, assignee=LANE, max_in_flight=5, actor="t")
        producer.redis.set(producer.keys.lane_poll(LANE), "a-dead-process", px=1_500)
        task = lanes.create(producer, assignee=LANE, title="no wake")["task"]
        producer.redis.delete(producer.keys.lane_wake(LANE))
        started = time.monotonic()
        answer = lanes.claim(waiter, assignee=LANE, worker="w1", wait_ms=20_000)
        assert answer["task"]["id"] == task["id"]
        assert time.monotonic() - started >= 1.0  # not before the dead lead expired
        assert producer.redis.get(producer.keys.lane_poll(LANE)) != "a-dead-process"
    finally:
        waiter.close()
        producer.close()


@pytest.mark.postgres
def test_a_closed_context_lets_go_of_the_lead(
        pg_url: str, redis_server_url: str, redis_prefix: str) -> None:
    s = make_settings(pg_url, redis_server_url, redis_prefix, pickup_safety_poll_ms=200)
    ctx = Context.from_settings(s)
    key = ctx.keys.lane_poll(LANE)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=5, actor="t")
    lanes.claim(ctx, assignee=LANE, worker="w1", wait_ms=300)
    assert ctx.redis.get(key) is not None  # this process leads the lane's safety poll
    ctx.close()
    probe = Context.from_settings(s)
    try:
        assert probe.redis.get(key) is None
    finally:
        probe.close()


@pytest.mark.postgres
def test_a_redis_that_dies_under_the_waiters_sends_them_to_notify(
        pg_url: str, redis_prefix: str) -> None:
    server = ThrowawayRedis()
    s = make_settings(pg_url, server.url, redis_prefix, pickup_safety_poll_ms=60_000)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    try:
        lane_control.configure_lane(producer, assignee=LANE, max_in_flight=5, actor="t")
        producer.redis.set(producer.keys.lane_poll(LANE), "another", px=60_000)
        t, box = _claim_in_thread(waiter, "w1", 20_000)
        _until(lambda: pickup.waiting(waiter, assignee=LANE) == 1, "the claim to wait")
        server.kill()
        with producer.engine.connect() as c:  # the waiter LISTENs now
            def listening() -> bool:
                n = c.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'LISTEN%%'").scalar_one()
                c.rollback()
                return bool(n)

            _until(listening, "the waiter to LISTEN")
        task = lanes.create(producer, assignee=LANE, title="over notify")["task"]
        t.join(30)
        assert box["answer"]["task"]["id"] == task["id"]
    finally:
        waiter.close()
        producer.close()
        server.stop()


@pytest.mark.postgres
def test_a_busy_redis_keeps_the_waiters_on_their_shared_wait(
        pg_url: str, redis_prefix: str) -> None:
    """Issue 22 item 5 for waiting claims: Redis busy for longer than the fast path's
    deadline (``DEBUG SLEEP``) delays the blocked wait, it does not break it: the fleet is
    not degraded and the create after it wakes the waiter through Redis, not NOTIFY."""
    server = ThrowawayRedis()
    s = make_settings(pg_url, server.url, redis_prefix, pickup_safety_poll_ms=60_000)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    sleeper = redis.Redis.from_url(server.url, socket_timeout=10)
    try:
        lane_control.configure_lane(producer, assignee=LANE, max_in_flight=5, actor="t")
        producer.redis.set(producer.keys.lane_poll(LANE), "another", px=60_000)
        t, box = _claim_in_thread(waiter, "w1", 20_000)
        _until(lambda: pickup.waiting(waiter, assignee=LANE) == 1, "the claim to wait")
        sleeper.execute_command("DEBUG", "SLEEP", "0.6")  # 2.4 x the 250 ms deadline
        task = lanes.create(producer, assignee=LANE, title="after the busy spell")["task"]
        t.join(30)
        assert box["answer"]["task"]["id"] == task["id"]
        assert not waiter.redis_health.degraded
        assert "_pickup_listener" not in waiter.__dict__  # never fell back to LISTEN
    finally:
        sleeper.close()
        waiter.close()
        producer.close()
        server.stop()
