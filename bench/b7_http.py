"""Bench 7: ``POST /api/autonomy`` claim over HTTP against the same operation in-process,
at 1 and 16 concurrent clients, on PostgreSQL.

The server is the real one: ``autonomy serve`` (uvicorn, loopback, no access log) in a
process of its own, as deployed. Each client is a worker of its own in a lane that allows
16 live leases; it claims, then completes what it claimed (over the same transport) so the
lane's live leases stay bounded and every claim grants a lease. The in-process baseline
makes the same ``ops.dispatch`` calls (16 threads for 16 clients). Each of the four runs
has a lane of its own seeded with the same backlog. Figures are requests/s (claim and
complete each count one); the claim's own median latency is in the JSON details.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from app import ops
from app.clock import utcnow
from app.ops import lane_control
from app.storage.context import Context
from bench.common import Env, Row, free_port
from bench.seed import analyze, seed_todo


class Server:
    """``autonomy serve`` in a subprocess of its own (stopped by its own pid)."""

    def __init__(self, env: Env, url: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith("AUTONOMY_") and k not in ("DATABASE_URL", "REDIS_URL")}
        child_env.update(AUTONOMY_DATABASE_URL=url, AUTONOMY_REDIS_URL=env.redis_url,
                         AUTONOMY_REDIS_PREFIX=env.prefix)
        self.log = open(os.path.join(env.tmp, "b7-server.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", "serve",
             "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"],
            env=child_env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.base + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"autonomy serve did not start (log: {self.log.name})")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def _cycle_body(assignee: str, worker: str) -> dict[str, Any]:
    return {"action": "claim", "assignee": assignee, "worker": worker}


def _complete_body(claimed: dict[str, Any]) -> dict[str, Any]:
    assert claimed.get("ok") and claimed.get("lease") and not claimed.get("guard"), claimed
    return {"action": "complete", "taskId": claimed["task"]["id"],
            "leaseToken": claimed["lease"]["token"], "outcome": "success"}


# --- over HTTP ------------------------------------------------------------------------


async def _http_client(http: httpx.AsyncClient, assignee: str, worker: str, cycles: int,
                       claim_times: list[float]) -> None:
    for _ in range(cycles):
        t0 = time.perf_counter()
        r = await http.post("/api/autonomy", json=_cycle_body(assignee, worker))
        claim_times.append(time.perf_counter() - t0)
        r2 = await http.post("/api/autonomy", json=_complete_body(r.json()))
        assert r2.status_code == 200, r2.text


async def _http_run(base: str, assignee: str, clients: int, cycles: int
                    ) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        await _http_client(http, assignee, "warm", 1, [])  # connect, warm the server
        t0 = time.perf_counter()
        await asyncio.gather(*(_http_client(http, assignee, f"c{i}", cycles, times)
                               for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return 2 * clients * cycles / elapsed, times


# --- in-process -----------------------------------------------------------------------


def _inproc_client(ctx: Context, assignee: str, worker: str, cycles: int,
                   claim_times: list[float]) -> None:
    for _ in range(cycles):
        t0 = time.perf_counter()
        got = ops.dispatch(ctx, _cycle_body(assignee, worker))
        claim_times.append(time.perf_counter() - t0)
        ops.dispatch(ctx, _complete_body(got))


def _inproc_run(ctx: Context, assignee: str, clients: int, cycles: int
                ) -> tuple[float, list[float]]:
    times: list[float] = []
    _inproc_client(ctx, assignee, "warm", 1, [])
    threads = [threading.Thread(target=_inproc_client, args=(ctx, assignee, f"c{i}", cycles,
                                                             times)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 2 * clients * cycles / (time.perf_counter() - t0), times


def run(env: Env) -> list[Row]:
    url = env.pg_database()
    plan = {1: env.size(500, 10), 16: env.size(100, 2)}  # cycles per client
    ctx = env.context(url)
    rows = []
    try:
        for clients, cycles in plan.items():
            for mode in ("http", "inproc"):
                lane = f"b7-{mode}-{clients}"
                lane_control.configure_lane(ctx, assignee=lane, max_in_flight=16, actor="bench")
                seed_todo(ctx.engine, assignee=lane, n=clients * cycles + 1, now=utcnow())
        analyze(ctx.engine)
        server = Server(env, url)
        try:
            got: dict[tuple[str, int], tuple[float, list[float]]] = {}
            for clients, cycles in plan.items():
                got["http", clients] = asyncio.run(
                    _http_run(server.base, f"b7-http-{clients}", clients, cycles))
                got["inproc", clients] = _inproc_run(ctx, f"b7-inproc-{clients}", clients,
                                                     cycles)
        finally:
            server.stop()
        for clients in plan:
            (h_rate, h_times), (i_rate, i_times) = got["http", clients], got["inproc", clients]
            rows.append(Row(
                bench=7, what=f"POST /api/autonomy claim(+complete) over HTTP, {clients} "
                              f"client{'s' if clients > 1 else ''}, PostgreSQL",
                figure=h_rate, unit="req/s", baseline=i_rate,
                baseline_what="same calls in-process (ops.dispatch)", target="report",
                details={"clients": clients, "cyclesPerClient": plan[clients],
                         "claimMedianMsHttp": statistics.median(h_times) * 1000,
                         "claimMedianMsInProcess": statistics.median(i_times) * 1000}))
    finally:
        ctx.close()
    return rows
