"""Push pickup (issue 13): a claim with ``waitMs`` on an empty lane waits for a signal --
the lane's Redis wake list, or PostgreSQL NOTIFY while Redis is degraded -- instead of
polling the database; one waiter per lane takes the slow safety poll.

What the database sees is counted from libpq's trace (``bench/roundtrips.py``), never
timed: a waiting claim costs no statement until a wake arrives."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.errors import InvalidInput
from app.ops import lane_control, lanes
from app.storage.context import Context
from bench.roundtrips import PgTrace, parse_trace
from tests.conftest import make_settings
from tests.servers import free_port

LANE = "pick"


def _claims(trace: PgTrace) -> int:
    """``autonomy_claim`` calls since the last look."""
    got = parse_trace(trace.take(), trace.prepared)
    return sum(s.startswith("SELECT outcome, row_json FROM autonomy_claim(")
               for s in got.statements)


@pytest.fixture
def two(pg_url: str, redis_server_url: str, redis_prefix: str
        ) -> Iterator[tuple[Context, Context, PgTrace]]:
    """A waiter's context (its statements traced) and a producer's, on one lane."""
    s = make_settings(pg_url, redis_server_url, redis_prefix, pickup_safety_poll_ms=60_000)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    trace = PgTrace(waiter.engine)
    lane_control.configure_lane(producer, assignee=LANE, max_in_flight=50, actor="t")
    try:
        yield waiter, producer, trace
    finally:
        trace.close()
        waiter.close()
        producer.close()


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        box["answer"] = fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.mark.postgres
def test_a_waiting_claim_costs_the_database_nothing_until_it_times_out(
        two: tuple[Context, Context, PgTrace]) -> None:
    waiter, _producer, trace = two
    waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)  # another took the poll
    trace.take()
    answer = lanes.claim(waiter, assignee=LANE, worker="w1", wait_ms=400)
    assert answer == {"ok": True, "task": None}
    assert _claims(trace) == 0


@pytest.mark.postgres
def test_a_create_wakes_a_waiting_claim_which_claims_once(
        two: tuple[Context, Context, PgTrace]) -> None:
    waiter, producer, trace = two
    waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)
    trace.take()
    t, box = _in_thread(lambda: lanes.claim(waiter, assignee=LANE, worker="w1",
                                            wait_ms=20_000))
    created = lanes.create(producer, assignee=LANE, title="wake up")["task"]
    t.join(30)
    assert not t.is_alive()
    assert box["answer"]["task"]["id"] == created["id"] and box["answer"]["lease"]
    assert _claims(trace) == 1  # the claim after the wake, no poll before it


@pytest.mark.postgres
def test_a_release_wakes_a_waiter_too(two: tuple[Context, Context, PgTrace]) -> None:
    waiter, producer, _trace = two
    lanes.create(producer, assignee=LANE, title="t")
    got = lanes.claim(producer, assignee=LANE, worker="holder")
    waiter.redis.delete(waiter.keys.lane_wake(LANE))
    waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)
    t, box = _in_thread(lambda: lanes.claim(waiter, assignee=LANE, worker="w2",
                                            wait_ms=20_000))
    lanes.release(producer, task_id=got["task"]["id"], lease_token=got["lease"]["token"])
    t.join(30)
    assert box["answer"]["task"]["id"] == got["task"]["id"]


@pytest.mark.postgres
def test_an_idle_fleet_claims_once_per_safety_period_whatever_its_size(
        pg_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """Twenty claims wait 1.5 s on an empty lane whose safety poll is 500 ms: at most one
    of them claims per period (SET NX PX), so the database sees a handful of claims, not
    twenty per period."""
    s = make_settings(pg_url, redis_server_url, redis_prefix, pickup_safety_poll_ms=500)
    ctx = Context.from_settings(s)
    trace = PgTrace(ctx.engine)
    try:
        lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=50, actor="t")
        trace.take()
        started = time.monotonic()
        threads = [_in_thread(lambda i=i: lanes.claim(ctx, assignee=LANE, worker=f"w{i}",
                                                      wait_ms=1_500))[0] for i in range(20)]
        for t in threads:
            t.join(60)
        periods = (time.monotonic() - started) / 0.5
        assert _claims(trace) <= periods + 1
    finally:
        trace.close()
        ctx.close()


@pytest.mark.postgres
def test_while_redis_is_down_postgres_notify_wakes_the_waiter(
        pg_url: str, redis_prefix: str) -> None:
    """No Redis at all: the waiter LISTENs, the create NOTIFYs in its own transaction."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    s = make_settings(pg_url, dead, redis_prefix, pickup_safety_poll_ms=60_000)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    try:
        lane_control.configure_lane(producer, assignee=LANE, max_in_flight=5, actor="t")
        t, box = _in_thread(lambda: lanes.claim(waiter, assignee=LANE, worker="w1",
                                                wait_ms=20_000))
        deadline = time.monotonic() + 20
        with producer.engine.connect() as c:  # wait for the waiter's LISTEN
            while not c.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'LISTEN%%'").scalar_one():
                c.rollback()
                assert time.monotonic() < deadline, "the waiter never listened"
                time.sleep(0.02)
        created = lanes.create(producer, assignee=LANE, title="over notify")["task"]
        t.join(30)
        assert box["answer"]["task"]["id"] == created["id"]
    finally:
        waiter.close()
        producer.close()


def test_wait_ms_is_bounded(ctx: Context) -> None:
    with pytest.raises(InvalidInput) as e:
        lanes.claim(ctx, assignee=LANE, worker="w1", wait_ms=ctx.settings.claim_wait_max_ms + 1)
    assert e.value.details.get("field") == "waitMs"
    with pytest.raises(InvalidInput):
        lanes.claim(ctx, assignee=LANE, worker="w1", wait_ms=-1)


@pytest.mark.postgres
def test_an_http_worker_long_polls_its_claim(two: tuple[Context, Context, PgTrace]) -> None:
    """``waitMs`` over HTTP: the server holds the empty claim and answers with the task
    a create made claimable meanwhile (one request, no polling by the client)."""
    from app.workers.client import HttpClient
    from tests.api_server import serve

    waiter, producer, trace = two
    waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)
    with serve(waiter) as server:
        http = HttpClient(server.url, settings=waiter.settings, timeout_s=5)
        try:
            trace.take()
            t, box = _in_thread(lambda: http.claim(LANE, "h1", wait_ms=20_000))
            created = lanes.create(producer, assignee=LANE, title="over http")["task"]
            t.join(30)
        finally:
            http.close()
    assert box["answer"]["task"]["id"] == created["id"]
    assert _claims(trace) == 1
