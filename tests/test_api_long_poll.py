"""HTTP long polls (a claim with ``waitMs``) on a real uvicorn: waiting workers never take
the threads the rest of the API answers on, and past the long-poll cap a claim answers at
once instead of queueing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app.ops import lane_control
from app.storage import pickup
from app.storage.context import Context
from tests.api_server import serve
from tests.conftest import make_settings

LANE = "polled"
WAIT_MS = 30_000  # the longest a claim may wait: no loaded machine delays 40 of them so


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Waiters:
    """Claims with ``waitMs`` sent from threads; each answer is kept as it arrives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[dict[str, Any]] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def send(self, worker: str) -> None:
        def claim() -> None:
            with httpx.Client(base_url=self.url, timeout=WAIT_MS / 1000 + 30) as http:
                r = http.post("/api/autonomy", json={
                    "action": "claim", "assignee": LANE, "worker": worker, "waitMs": WAIT_MS})
            with self.lock:
                self.answers.append({"status": r.status_code, **r.json()})

        t = threading.Thread(target=claim, daemon=True)
        t.start()
        self.threads.append(t)

    def empty(self) -> int:
        with self.lock:
            return sum(a.get("task") is None for a in self.answers)

    def join(self) -> None:
        for t in self.threads:
            t.join(WAIT_MS / 1000 + 40)


def _waiting(ctx: Context) -> int:
    """Claims waiting on the lane in the server's process (they share one blocked wait on
    Redis: ``app.storage.pickup_hub``)."""
    return pickup.waiting(ctx, assignee=LANE)


@pytest.fixture
def lctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            api_long_poll_max=64))
    yield c
    c.close()


@pytest.mark.slow
def test_fifty_waiting_workers_do_not_starve_the_rest_of_the_api(
        lctx: Context) -> None:
    """More long polls than the server's default thread pool (40): a create, the probes and
    the status are answered while every claim still waits, and each waiter gets one task."""
    n = 50
    lane_control.configure_lane(lctx, assignee=LANE, max_in_flight=n, actor="test")
    with serve(lctx) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        waiters = Waiters(server.url)
        for i in range(n):
            waiters.send(f"w{i}")
        _until(lambda: _waiting(lctx) >= n, f"{n} claims to wait on the lane")
        assert http.get("/livez").status_code == 200
        assert http.get("/api/autonomy/status").status_code == 200
        made = http.post("/api/autonomy", json={"action": "create", "assignee": LANE,
                                                "title": "t0"}).json()
        assert made["ok"] is True
        assert waiters.empty() == 0  # answered while every claim was still waiting
        for i in range(1, n):  # one task per waiter: each wakes one claim
            assert http.post("/api/autonomy", json={"action": "create", "assignee": LANE,
                                                    "title": f"t{i}"}).json()["ok"] is True
        waiters.join()
    assert len(waiters.answers) == n and waiters.empty() == 0
    assert all(a["status"] == 200 and a["ok"] is True for a in waiters.answers)
    assert all(a.get("lease") and a.get("guard") is None for a in waiters.answers)
    assert len({a["task"]["id"] for a in waiters.answers}) == n  # no task granted twice


def test_past_the_long_poll_cap_a_claim_answers_at_once(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_long_poll_max=2))
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=3, actor="test")
    try:
        with serve(ctx) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            waiters = Waiters(server.url)
            waiters.send("w0")
            waiters.send("w1")
            _until(lambda: _waiting(ctx) >= 2, "two claims to wait on the lane")
            third = http.post("/api/autonomy", json={
                "action": "claim", "assignee": LANE, "worker": "w2", "waitMs": WAIT_MS})
            assert third.status_code == 200
            # no slot: did not wait
            assert third.json() == {"ok": True, "action": "claim", "task": None}
            assert waiters.empty() == 0  # the two still wait
            for i in range(2):
                assert http.post("/api/autonomy", json={
                    "action": "create", "assignee": LANE, "title": f"t{i}"}).json()["ok"]
            waiters.join()
        assert sorted(a["task"]["title"] for a in waiters.answers) == ["t0", "t1"]
    finally:
        ctx.close()
