"""Long polls on a real ``autonomy serve`` process: hundreds of waiting claims hold no
thread each (the process's thread count stays bounded while they wait), are woken and
served one task each; a client that goes away stops waiting and its turn goes on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.ops import history, lane_control, lanes
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent
LANE = "waited"
WAIT_MS = 30_000


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Served:
    """``autonomy serve`` in a subprocess of its own, stopped by its pid."""

    def __init__(self, ctx: Context, tmp: Path) -> None:
        s = ctx.settings
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
        env.update(AUTONOMY_DATABASE_URL=s.database_url, AUTONOMY_REDIS_URL=s.redis_url,
                   AUTONOMY_REDIS_PREFIX=s.redis_prefix)
        self.log = (tmp / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", self.url.rsplit(":", 1)[1],
             "--no-access-log"], env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30)
        _until(self._up, "autonomy serve to answer")

    def _up(self) -> bool:
        assert self.proc.poll() is None, Path(self.log.name).read_text()
        try:
            return self.http.get("/livez").status_code == 200
        except httpx.HTTPError:
            return False

    def waiting(self) -> int:
        return int(self.http.get("/livez").json()["longPolls"])

    def threads(self) -> int:
        return psutil.Process(self.proc.pid).num_threads()  # /proc/PID/status Threads

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def pctx(pg_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    c = Context.from_settings(make_settings(pg_url, redis_server_url, redis_prefix))
    yield c
    c.close()


@pytest.fixture
def served(pctx: Context, tmp_path: Path) -> Iterator[Served]:
    server = Served(pctx, tmp_path)
    yield server
    server.stop()


async def _claim(http: httpx.AsyncClient, worker: str) -> dict[str, Any]:
    r = await http.post("/api/autonomy", json={"action": "claim", "assignee": LANE,
                                               "worker": worker, "waitMs": WAIT_MS})
    return {"status": r.status_code, **r.json()}


@pytest.mark.slow
def test_hundreds_of_waiting_claims_hold_no_thread_each_and_are_all_served(
        pctx: Context, served: Served) -> None:
    n = 300
    lane_control.configure_lane(pctx, assignee=LANE, max_in_flight=n, actor="test")
    # warm the server's thread pool the way the waiters will (their checks run there)
    for _ in range(3):
        served.http.post("/api/autonomy", json={"action": "claim", "assignee": LANE,
                                                "worker": "warm"})
    base = served.threads()
    answers: list[dict[str, Any]] = []

    async def run() -> None:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=served.url, limits=limits,
                                     timeout=WAIT_MS / 1000 + 30) as http:
            claims = [asyncio.ensure_future(_claim(http, f"w{i}")) for i in range(n)]
            waited = await asyncio.to_thread(_until, lambda: served.waiting() >= n,
                                             f"{n} claims to wait")
            del waited
            threads = served.threads()
            assert sum(c.done() for c in claims) == 0  # every one still waits
            # bounded: the server's thread pool and a feeder, not one thread per waiter
            assert threads - base <= 45, (base, threads)
            await asyncio.to_thread(_create, pctx, n)
            answers.extend(await asyncio.gather(*claims))

    asyncio.run(run())
    assert len(answers) == n
    assert all(a["status"] == 200 and a["ok"] is True and a["action"] == "claim"
               for a in answers)
    assert all(a.get("lease") and a.get("task") for a in answers)
    assert len({a["task"]["id"] for a in answers}) == n  # one task each, none twice
    _until(lambda: served.waiting() == 0, "the waits to end")


def _create(ctx: Context, n: int) -> None:
    for i in range(n):
        assert lanes.create(ctx, assignee=LANE, title=f"t{i}")["ok"] is True


@pytest.mark.slow
def test_a_client_that_goes_away_stops_waiting_and_the_next_waiter_is_served(
        pctx: Context, served: Served) -> None:
    lane_control.configure_lane(pctx, assignee=LANE, max_in_flight=5, actor="test")

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=served.url, timeout=WAIT_MS / 1000 + 30
                                     ) as stays, \
                httpx.AsyncClient(base_url=served.url, timeout=WAIT_MS / 1000 + 30
                                  ) as leaves:
            gone = asyncio.ensure_future(_claim(leaves, "leaves"))
            await asyncio.to_thread(_until, lambda: served.waiting() >= 1, "a claim to wait")
            kept = asyncio.ensure_future(_claim(stays, "stays"))
            await asyncio.to_thread(_until, lambda: served.waiting() >= 2, "two to wait")
            gone.cancel()  # its connection closes
            await asyncio.gather(gone, return_exceptions=True)
            await leaves.aclose()
            await asyncio.to_thread(_until, lambda: served.waiting() == 1,
                                    "the server to drop the claim whose client left")
            await asyncio.to_thread(_create, pctx, 1)
            return await kept

    got = asyncio.run(run())
    assert got["status"] == 200 and got["task"]["title"] == "t0" and got["lease"]
    status = lanes.claim(pctx, assignee=LANE, worker="probe")  # nothing else is left
    assert status == {"ok": True, "task": None}
    held = history.recent_tasks(pctx, assignee=LANE, status="in_progress")
    assert [t["claimedBy"] for t in held] == ["stays"]  # the one that left holds nothing


def test_a_lease_granted_to_a_client_that_went_away_is_released(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """At the ASGI edge, to place the disconnect exactly: the client is gone by the time
    its claim is granted (the lane had a task), so the lease goes back at once. The claim
    is granted in its first step, before it waits, because Redis is down (the database
    decides every claim then): with Redis up its first step waits for the process's
    shared wait to hand it the create's wake, and a client gone by then is dropped before
    any lease (the test above)."""
    from app.api.app import create_app

    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: Redis is down
    ctx = Context.from_settings(make_settings(sqlite_url, nowhere, redis_prefix))
    try:
        made = lanes.create(ctx, assignee=LANE, title="t0")
        app = create_app(ctx=ctx)
        body = b'{"action": "claim", "assignee": "%s", "worker": "left", "waitMs": 5000}' % (
            LANE.encode())
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/api/autonomy",
                 "raw_path": b"/api/autonomy", "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80), "state": {}}
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
        assert sent[0]["status"] == 499  # nobody reads it
        task = history.recent_tasks(ctx, assignee=LANE)[0]
        assert task["id"] == made["task"]["id"] and task["status"] == "todo"
        kinds = [e["kind"] for e in history.history(ctx, task_id=task["id"])["events"]]
        assert "lease_released" in kinds
    finally:
        ctx.close()
