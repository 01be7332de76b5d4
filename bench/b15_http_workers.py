"""Bench 15 (issue 22 item 3): HTTP workers.

1. **1,000 long polls on one API process**: one ``autonomy serve`` process; 1,000 HTTP
   claims with ``waitMs`` wait on an empty lane (asyncio clients in this process, one
   connection each). Read from ``/proc`` (psutil) before and while they wait: the
   server's threads and resident memory, so the memory a waiter costs. Then tasks are
   created one at a time (in-process ``lanes.create``, each once the previous one was
   picked up and its waiter is back in line): pickup is create called -> the granted
   claim's answer read by its client, p50/p99. Target: pickup p50 <= 10 ms.
2. **8 HTTP LaneWorkers against 8 direct ones**: worker processes draining the same
   backlog of no-op tasks, in the same run, rounds interleaved (median reported): direct
   (``LocalClient``) and over HTTP (``HttpClient``) to N ``autonomy serve`` processes,
   each worker talking to one of them (round robin). Target: HTTP >= 0.7x direct. The
   same pair again with every worker's prefetch at K = 10 (bench 8's batched mode; the
   HTTP workers through 2 API processes): one request per K tasks instead of per task.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from typing import Any

import httpx
import psutil

from app.clock import utcnow
from app.ops import lane_control, lanes
from bench import peers
from bench.b7_http import Server
from bench.b8_drain import PREFETCH, _autonomy_db_check, lane_room
from bench.common import Env, Row
from bench.fleet import Recorder, Shared, drain
from bench.seed import analyze, seed_todo

WAITERS = 1_000
API_PROCESSES = (2, 4)  # HTTP fleets: API processes behind the 8 workers
BATCHED_API_PROCESSES = 2  # behind the 8 HTTP workers with a prefetch
WAIT_MS = 30_000


# --- 1. waiting long polls ------------------------------------------------------------


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


async def _waiting(env: Env, server: Server, ctx: Any, lane: str, n: int, picks: int
                   ) -> dict[str, Any]:
    proc = psutil.Process(server.proc.pid)
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    got: asyncio.Queue[tuple[float, int]] = asyncio.Queue()
    stop = asyncio.Event()
    errors: list[str] = []  # transport errors, each retried (a keep-alive the server closed)
    fatal: list[str] = []  # a waiter that stopped

    async def waiter(http: httpx.AsyncClient, i: int) -> None:
        # a worker that was granted a task claims next under a new name: the same name
        # would be answered its own lease again (the duplicate-claim guard), not wait
        body = {"action": "claim", "assignee": lane, "worker": f"p{i}", "waitMs": WAIT_MS}
        granted = 0
        while not stop.is_set():
            try:
                r = await http.post("/api/autonomy", json=body)
            except httpx.TransportError as e:  # a keep-alive connection the server closed
                if stop.is_set():
                    return
                errors.append(repr(e))
                if len(errors) > n:
                    fatal.append(f"{len(errors)} transport errors: {errors[:3]}")
                    return
                continue
            except (httpx.HTTPError, RuntimeError) as e:  # RuntimeError: client closed
                if not stop.is_set():
                    fatal.append(repr(e))
                return
            at = time.perf_counter()
            a = r.json()
            if a.get("task") is not None:
                got.put_nowait((at, a["task"]["id"]))
                granted += 1
                body = {**body, "worker": f"p{i}-{granted}"}

    async with httpx.AsyncClient(base_url=server.base, limits=limits,
                                 timeout=WAIT_MS / 1000 + 30) as http, \
            httpx.AsyncClient(base_url=server.base, timeout=30) as probe:

        async def in_line() -> int:
            for _ in range(3):  # a keep-alive connection the server closed meanwhile
                try:
                    return int((await probe.get("/livez")).json()["longPolls"])
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            return int((await probe.get("/livez")).json()["longPolls"])

        # warm the server's thread pool (anyio's, 40 threads) as the waiters will use it:
        # each claim's checks and first try run there before it waits
        await asyncio.gather(*(http.post("/api/autonomy", json={
            "action": "claim", "assignee": lane, "worker": f"warm{i}"}) for i in range(60)))
        await asyncio.sleep(1.0)
        idle_threads, idle_rss = proc.num_threads(), proc.memory_info().rss
        tasks = [asyncio.ensure_future(waiter(http, i)) for i in range(n)]
        deadline = time.monotonic() + 120
        while await in_line() < n:
            if time.monotonic() > deadline or fatal:
                raise RuntimeError(f"{n} long polls did not all wait: {fatal[:3]} (transport "
                                   f"errors, retried: {errors[:3]})")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # settled
        wait_threads, wait_rss = proc.num_threads(), proc.memory_info().rss
        peak_threads = wait_threads
        lat: list[float] = []
        for i in range(picks):
            back_by = time.monotonic() + 60
            while await in_line() < n:  # the last pick's waiter is back in line
                if time.monotonic() > back_by or fatal:
                    raise RuntimeError(f"the waiters are not back in line: {fatal[:3]} "
                                       f"(transport errors, retried: {errors[:3]})")
                await asyncio.sleep(0.002)
            t0 = time.perf_counter()
            made = await asyncio.to_thread(lanes.create, ctx, assignee=lane, title=f"p{i}")
            while True:
                at, tid = await asyncio.wait_for(got.get(), 30)
                if tid == made["task"]["id"]:
                    break
            lat.append(at - t0)
            peak_threads = max(peak_threads, proc.num_threads())
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat.sort()
    return {"waiters": n, "threadsIdle": idle_threads, "threadsWaiting": wait_threads,
            "threadsPeakDuringPickups": peak_threads, "rssIdleMb": idle_rss / 2**20,
            "rssWaitingMb": wait_rss / 2**20,
            "rssPerWaiterKb": (wait_rss - idle_rss) / n / 1024,
            "pickups": picks, "pickupP50Ms": statistics.median(lat) * 1000,
            "pickupP99Ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            "pickupMaxMs": lat[-1] * 1000, "errors": errors[:3]}


# --- 2. HTTP LaneWorkers against direct ones ------------------------------------------


def autonomy_http_worker(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    """``peers.autonomy_worker`` over HTTP: a ``LaneWorker`` with an ``HttpClient``."""
    from app.settings import Settings
    from app.workers.client import HttpClient
    from app.workers.lane_worker import LaneWorker

    rec = Recorder(shared)
    client = HttpClient(cfg["url"], settings=Settings(**cfg["settings"]), timeout_s=60)

    def handler(task: dict[str, Any]) -> None:
        rec.ran(task["id"], task["payload"].get("seq"))

    worker = LaneWorker(cfg["lane"], handler, worker_name=name, client=client,
                        say=lambda _line: None, prefetch=cfg.get("prefetch", 1))
    stop = threading.Event()
    try:
        client.claim("bench-warm", name)  # connect
        rec.on_stop(stop.set)
        rec.started()
        worker.run(stop, handle_signals=False)
        rec.report()
    finally:
        client.close()


def _drain(env: Env, url: str, jobs: int, procs: int, lane: str,
           servers: list[Server] | None, prefetch: int = 1) -> dict[str, Any]:
    ctx = env.context(url)
    try:
        lane_control.configure_lane(ctx, assignee=lane, max_in_flight=lane_room(procs, prefetch),
                                    actor="bench")
        seed_todo(ctx.engine, assignee=lane, n=jobs, now=utcnow())
        analyze(ctx.engine)
        settings = env.settings(url).model_dump()
        settings["api_token"] = None
        if servers is None:
            got = drain(peers.autonomy_worker, {"settings": settings, "lane": lane,
                                                "worker_kw": {"prefetch": prefetch}},
                        procs=procs, jobs=jobs)
        else:
            from bench.fleet import Fleet

            cfgs = [{"settings": settings, "lane": lane, "url": servers[i % len(servers)].base,
                     "prefetch": prefetch} for i in range(procs)]
            got = _drain_fleet(Fleet(autonomy_http_worker, {}, procs, cfgs=cfgs), jobs)
        got["db"] = _autonomy_db_check(ctx.engine, lane)
        got["exactlyOnce"] = (got["exactlyOnce"] and got["db"]["ok"]
                              and got["db"]["done"] == jobs)
        return got
    finally:
        ctx.close()


def _drain_fleet(fleet: Any, jobs: int, timeout_s: float = 600) -> dict[str, Any]:
    """``bench.fleet.drain`` for a fleet given its per-process configs."""
    fleet.shared.target.value = jobs
    fleet.start()
    t0 = fleet.go()
    finished = fleet.wait_done(timeout_s)
    elapsed = time.perf_counter() - t0
    reports = fleet.stop()
    ids = [i for r in reports for i in r["ids"]]
    executions = fleet.shared.executions.value
    return {"throughput": executions / elapsed if finished else 0.0,
            "elapsedS": round(elapsed, 3), "executions": executions,
            "distinct": len(set(ids)), "finished": finished,
            "exactlyOnce": finished and executions == jobs and len(set(ids)) == jobs
            and len(ids) == jobs}


def run(env: Env) -> list[Row]:
    return pickup_rows(env) + fleet_rows(env)


def pickup_rows(env: Env) -> list[Row]:
    """Part 1: long polls on one API process."""
    rows: list[Row] = []
    url = env.pg_database()
    ctx = env.context(url)
    n = env.size(WAITERS, 50)
    picks = env.size(200, 10)
    lane = "b14-wait"
    load_before = _loadavg()
    try:
        lane_control.configure_lane(ctx, assignee=lane, max_in_flight=n + picks + 10,
                                    actor="bench")
        lane_control.configure_lane(ctx, assignee=lane + "-1", max_in_flight=picks + 10,
                                    actor="bench")
        one: dict[str, Any] = {}
        for lane_n, waiters, out in ((lane + "-1", 1, one), (lane, n, None)):
            server = Server(env, url)  # a fresh API process for each size
            try:
                got = asyncio.run(_waiting(env, server, ctx, lane_n, waiters, picks))
            finally:
                server.stop()
            if out is not None:
                out.update(got)
        w = got
        w["oneWaiter"] = {k: one[k] for k in ("pickupP50Ms", "pickupP99Ms", "threadsIdle",
                                              "threadsWaiting")}
        w["load"] = f"{load_before} -> {_loadavg()}"
        rows.append(Row(
            bench=15, what=f"pickup p50 with {n} HTTP long polls waiting on one API process "
                           f"(threads {w['threadsIdle']} idle -> {w['threadsWaiting']} "
                           f"waiting; {w['rssPerWaiterKb']:.1f} KB RSS a waiter)",
            figure=w["pickupP50Ms"], unit="ms", baseline=10.0,
            baseline_what="the issue's line (10 ms)", target="<= 1.0",
            details=w, extra_ok=w["threadsWaiting"] - w["threadsIdle"] < n / 10,
            extra_target="threads do not grow with the waiters"))
        rows.append(Row(
            bench=15, what=f"pickup p50 with {n} HTTP long polls waiting on one API process, "
                           "against 1 waiting",
            figure=w["pickupP50Ms"], unit="ms", baseline=one["pickupP50Ms"],
            baseline_what="1 HTTP long poll waiting (same run)", target="report"))
        rows.append(Row(
            bench=15, what=f"pickup p99 with {n} HTTP long polls waiting on one API process, "
                           "against 1 waiting",
            figure=w["pickupP99Ms"], unit="ms", baseline=one["pickupP99Ms"],
            baseline_what="1 HTTP long poll waiting (same run)", target="report"))
    finally:
        ctx.close()
    return rows


def fleet_rows(env: Env) -> list[Row]:
    """Part 2: 8 HTTP LaneWorkers against 8 direct ones."""
    rows: list[Row] = []
    procs = 8
    jobs = env.size(3_000, 80)
    rounds = env.size(2, 1)
    load_before = _loadavg()
    # mode -> (API processes, None for direct; the workers' prefetch)
    modes: dict[str, tuple[int | None, int]] = {"direct": (None, 1)}
    modes.update({f"http x{k}": (k, 1) for k in API_PROCESSES})
    modes[f"direct k{PREFETCH}"] = (None, PREFETCH)
    modes[f"http x{BATCHED_API_PROCESSES} k{PREFETCH}"] = (BATCHED_API_PROCESSES, PREFETCH)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode, (k, prefetch) in modes.items():
            db = env.pg_database()
            lane_r = f"b14-{mode.replace(' ', '')}-{r}"
            servers = [Server(env, db) for _ in range(k or 0)]
            try:
                results[mode].append(_drain(env, db, jobs, procs, lane_r, servers or None,
                                            prefetch))
            finally:
                for s in servers:
                    s.stop()
    load = f"{load_before} -> {_loadavg()}"
    direct = statistics.median(x["throughput"] for x in results["direct"])
    exactly_once = all(x["exactlyOnce"] for v in results.values() for x in v)
    for k in API_PROCESSES:
        runs = results[f"http x{k}"]
        rows.append(Row(
            bench=15, what=f"{procs} HTTP LaneWorkers, {k} API processes, {jobs} no-op tasks",
            figure=statistics.median(x["throughput"] for x in runs), unit="tasks/s",
            baseline=direct, baseline_what=f"{procs} direct LaneWorkers (same run)",
            target=">= 0.7",
            details={"rounds": {m: [round(x["throughput"], 1) for x in v]
                                for m, v in results.items()},
                     "load": load, "cpus": os.cpu_count()},
            extra_ok=exactly_once, extra_target="exactly once"))
    k, batched = BATCHED_API_PROCESSES, results[f"http x{BATCHED_API_PROCESSES} k{PREFETCH}"]
    rows.append(Row(
        bench=15, what=f"{procs} HTTP LaneWorkers with prefetch {PREFETCH}, {k} API processes, "
                       f"{jobs} no-op tasks",
        figure=statistics.median(x["throughput"] for x in batched), unit="tasks/s",
        baseline=statistics.median(x["throughput"] for x in results[f"direct k{PREFETCH}"]),
        baseline_what=f"{procs} direct LaneWorkers with prefetch {PREFETCH} (same run)",
        target=">= 0.7", details=rows[-1].details,
        extra_ok=exactly_once, extra_target="exactly once"))
    return rows
