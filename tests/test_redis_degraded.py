"""SPEC 4.7: Redis down, stalled or restarted empty. Claims, heartbeats and completes go
to the database alone after the fast path's short deadline, with the same answers and
guards; status and ``/metrics`` say ``redis: degraded``; nothing an emptied Redis says is
trusted over the database. Each test owns its redis-server (never the shared one)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app import ops
from app.api import metrics
from app.clock import FrozenClock
from app.ops import lane_control, lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.redis_conn import RedisHealth
from app.workers.client import LocalClient
from app.workers.lane_worker import LaneWorker
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis


def _ctx(database_url: str, server: ThrowawayRedis, clock: FrozenClock,
         **overrides: Any) -> Context:
    s = make_settings(database_url, server.url, "t:", redis_fast_path_timeout_ms=200,
                      **overrides)
    return Context.from_settings(s, clock=clock)


@pytest.fixture
def dctx(database_url: str, own_redis: ThrowawayRedis, clock: FrozenClock
         ) -> Iterator[Context]:
    """Re-probes a degraded Redis after 1 ms (so a test sees it come back at once)."""
    c = _ctx(database_url, own_redis, clock, redis_reprobe_first_ms=1, redis_reprobe_max_ms=1)
    yield c
    c.close()


def _until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _gauge(payload: dict[str, Any]) -> str:
    text = metrics.render(payload).decode()
    return next(ln for ln in text.splitlines() if ln.startswith("autonomy_redis_degraded "))


def _lane_round(ctx: Context) -> None:
    """Every claim/heartbeat/complete answer and guard of one lane (maxInFlight 1)."""
    lanes.create(ctx, assignee="coder", title="a")
    lanes.create(ctx, assignee="coder", title="b")
    first = lanes.claim(ctx, assignee="coder", worker="w1")
    assert "guard" not in first and first["lease"]
    tid, token = first["task"]["id"], first["lease"]["token"]
    again = lanes.claim(ctx, assignee="coder", worker="w1")
    assert again["guard"] == "duplicate_claim_guard"
    assert again["lease"]["token"] == token  # a retried claim gets its own lease back
    other = lanes.claim(ctx, assignee="coder", worker="w2")
    assert other["guard"] == "duplicate_claim_guard" and other["leaseHolder"] == "w1"
    assert "lease" not in other
    assert lanes.heartbeat(ctx, task_id=tid, lease_token=token)["ok"] is True
    done = lanes.complete(ctx, task_id=tid, lease_token=token, outcome="success")
    assert done["task"]["status"] == "done"
    dup = lanes.complete(ctx, task_id=tid, lease_token=token, outcome="success")
    assert dup["guard"] == "duplicate_complete_guard"
    nxt = lanes.claim(ctx, assignee="coder", worker="w2")
    assert nxt["task"]["title"] == "b" and nxt["lease"]


def test_claims_heartbeats_and_completes_answer_from_the_database_while_redis_is_down(
        dctx: Context, own_redis: ThrowawayRedis) -> None:
    own_redis.kill()
    _lane_round(dctx)
    assert dctx.redis_health.degraded
    status = ops.dispatch(dctx, {"action": "status"})
    assert status["redis"] == "degraded"
    assert status["workflowHealth"]["error"] == "redis_unavailable"
    assert _gauge(status) == "autonomy_redis_degraded 1.0"
    # a pause is still refused from the database alone
    lane_control.pause_lane(dctx, assignee="coder", reason="freeze", actor="alice")
    with pytest.raises(Exception) as err:
        lanes.claim(dctx, assignee="coder", worker="w3")
    assert getattr(err.value, "code", None) == "lane_paused"


@pytest.mark.slow
def test_claims_answer_while_redis_is_stalled(dctx: Context, own_redis: ThrowawayRedis) -> None:
    """SIGSTOP: Redis accepts connections and never answers. Before the fast path had its
    own deadline every claim waited for the 5 s socket timeout and then failed with
    redis_unavailable."""
    assert ops.dispatch(dctx, {"action": "status"})["redis"] == "ok"  # connections open
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        _lane_round(dctx)
        assert dctx.redis_health.degraded
        assert ops.dispatch(dctx, {"action": "status"})["redis"] == "degraded"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    _until(lambda: ops.dispatch(dctx, {"action": "status"})["redis"] == "ok")


def test_after_redis_returns_empty_the_database_guard_still_holds(
        dctx: Context, own_redis: ThrowawayRedis) -> None:
    lanes.create(dctx, assignee="coder", title="a")
    held = lanes.claim(dctx, assignee="coder", worker="w1")
    own_redis.restart()  # empty: the lease key and the lane's meta are gone
    other = lanes.claim(dctx, assignee="coder", worker="w2")
    assert other["guard"] == "duplicate_claim_guard" and other["leaseHolder"] == "w1"
    mine = lanes.claim(dctx, assignee="coder", worker="w1")
    assert mine["lease"]["token"] == held["lease"]["token"]
    _until(lambda: ops.dispatch(dctx, {"action": "status"})["redis"] == "ok")
    assert _gauge(ops.dispatch(dctx, {"action": "status"})) == "autonomy_redis_degraded 0.0"
    assert not dctx.redis_health.degraded


def test_a_degraded_redis_is_not_asked_again_until_its_reprobe_is_due(
        database_url: str, own_redis: ThrowawayRedis, clock: FrozenClock) -> None:
    """While degraded the fast path skips Redis (no reconnect per action): a Redis that
    is back is not written to before the re-probe time."""
    c = _ctx(database_url, own_redis, clock, redis_reprobe_first_ms=600_000,
             redis_reprobe_max_ms=600_000)
    try:
        lanes.create(c, assignee="coder", title="a")
        own_redis.kill()
        lanes.create(c, assignee="coder", title="b")
        assert lanes.claim(c, assignee="coder", worker="w1")["lease"]
        assert c.redis_health.degraded
        own_redis.restart()
        got = lanes.claim(c, assignee="coder", worker="w2")
        assert got["guard"] == "duplicate_claim_guard"
        assert c.redis.keys("t:*") == []  # not asked: nothing recorded, no guard logged
        assert ops.dispatch(c, {"action": "status"})["redis"] == "degraded"
    finally:
        c.close()


def test_redis_health_backs_off_doubling_to_its_cap_and_clears_on_success() -> None:
    h = RedisHealth(first_ms=100_000, max_ms=350_000)
    assert h.usable() and not h.degraded
    delays = []
    for _ in range(4):
        h.failed(ConnectionError("down"))
        assert not h.usable()
        delays.append(h._delay_s)
    assert delays == [100.0, 200.0, 350.0, 350.0]
    h.ok()
    assert h.usable() and not h.degraded and h.since is None


def test_a_worker_logs_a_superseded_outcome_as_refused_never_done(
        dctx: Context, clock: FrozenClock) -> None:
    """SPEC 4.2: w1's lease expired and w2 completed the task; w1's late success is
    refused (stale_lease) and w1 says "outcome refused"."""
    tid = lanes.create(dctx, assignee="coder", title="a")["task"]["id"]
    lines: list[str] = []

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        clock.advance(seconds=dctx.settings.lease_ttl_s + 1)
        won = lanes.claim(dctx, assignee="coder", worker="w2")
        lanes.complete(dctx, task_id=tid, lease_token=won["lease"]["token"], outcome="success")
        return {"late": True}

    w = LaneWorker("coder", handler, worker_name="w1", client=LocalClient(dctx),
                   say=lines.append, heartbeat_interval_s=3600)
    job = w.claim_one(threading.Event())
    assert job is not None
    w.work(job)
    assert any("outcome refused (stale_lease)" in ln for ln in lines), lines
    assert not any(ln.endswith(": done") for ln in lines), lines
    with transaction(dctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
    assert row is not None and row["claimed_by"] == "w2" and row["result"] is None
