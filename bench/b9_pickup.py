"""Bench 9 (issue 13 b, issue 22 item 4): pickup latency (create -> handler starts) and
what an idle fleet costs, with 1, 50, 200 and 1,000 workers waiting on one empty queue:
autonomy (``LaneWorker``s waiting in claims with ``waitMs``, push pickup) beside pgqueuer
(LISTEN/NOTIFY) and Celery (Redis broker, ``--pool=solo``) at 1 and 50.

Workers run as threads (autonomy: 25 a process, 100 a process at 1,000 so that the
fleet's database pools stay inside the shared server's 100 connections) or asyncio tasks
(pgqueuer, 25 a process); Celery's are processes. Redis is a server of the bench's own
(``tests.servers.ThrowawayRedis``), so its command count is ours alone (every command,
whoever sent it, less the bench's own INFO); each system's PostgreSQL database is its
own, so its transaction count (``pg_stat_database``) is too. Idle cost is read over a
window after the fleet settled (60 s: two of autonomy's ``pickup_block_s`` re-arms); then
jobs are created one at a time, each once the previous one was picked up.

Targets (autonomy): pickup p50 <= 5 ms and p99 <= 20 ms at every fleet size; idle Redis
<= 0.2 commands/s per waiting worker; idle database transactions <= 1/s whatever the
fleet's size.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy as sa

from app.ops import lane_control, lanes
from bench import peers
from bench.common import Env, Row
from bench.fleet import Fleet, Recorder, Shared

PER_PROCESS = 25
PER_PROCESS_1000 = 100  # at 1,000 waiters: 10 processes, not 40 (database connections)
SETTLE_S = 12.0
LANE = "pickup"


# --- worker processes -----------------------------------------------------------------


def autonomy_idle(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    from app.settings import Settings
    from app.storage.context import Context
    from app.storage.db import make_engine
    from app.workers.client import LocalClient
    from app.workers.lane_worker import LaneWorker

    rec = Recorder(shared)
    ctx = Context.from_settings(Settings(**cfg["settings"]))
    # a small pool: up to 40 such processes share one PostgreSQL of 100 connections
    ctx.engine.dispose()
    ctx.engine = make_engine(ctx.settings.database_url, pool_size=2, max_overflow=2)
    client = LocalClient(ctx)
    stop = threading.Event()

    def handler(task: dict[str, Any]) -> None:
        rec.ran(task["id"], task["payload"].get("seq"))

    workers = [LaneWorker(LANE, handler, worker_name=f"{name}-{i}", client=client,
                          say=lambda _line: None) for i in range(cfg["threads"])]
    client.claim("bench-warm", name)
    rec.on_stop(stop.set)
    rec.started()
    threads = [threading.Thread(target=w.run, args=(stop,), kwargs={"handle_signals": False})
               for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.report()
    ctx.close()


def pgqueuer_idle(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    rec = Recorder(shared)

    async def main() -> None:
        qms = []
        for _ in range(cfg["threads"]):
            qm = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(cfg["dsn"]))))

            @qm.entrypoint("noop")
            async def noop(job: Any) -> None:
                rec.ran(job.id, int(job.payload.decode()))

            qms.append(qm)
        loop = asyncio.get_running_loop()
        rec.on_stop(lambda: [loop.call_soon_threadsafe(q.shutdown.set) for q in qms])
        await loop.run_in_executor(None, rec.started)
        await asyncio.gather(*(q.run(batch_size=1) for q in qms))

    asyncio.run(main())
    rec.report()


# --- producers ------------------------------------------------------------------------


class Producer:
    """Creates job ``seq`` of one system; ``close`` releases what it holds."""

    def __init__(self, create: Callable[[int], None], close: Callable[[], None]) -> None:
        self.create, self.close = create, close


def _autonomy(env: Env, redis_url: str, n: int) -> tuple[Any, dict[str, Any], Producer, str]:
    url = env.pg_database()
    ctx = env.context(url, redis_client=redis.Redis.from_url(redis_url, decode_responses=True))
    ctx.settings = ctx.settings.model_copy(update={"redis_url": redis_url})
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=max(n, 1), actor="bench")
    settings = ctx.settings.model_dump()
    settings["api_token"] = None
    cfg = {"settings": settings}
    prod = Producer(lambda seq: lanes.create(ctx, assignee=LANE, title=f"p{seq}",
                                             payload={"seq": seq}), ctx.close)
    return autonomy_idle, cfg, prod, url


def _pgqueuer(env: Env, redis_url: str, n: int) -> tuple[Any, dict[str, Any], Producer, str]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    dsn = env._url_for(env._create_db("bench_pgq_idle")).replace("postgresql+psycopg://",
                                                                  "postgresql://")
    asyncio.run(peers.pgqueuer_setup(dsn))
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(dsn))
    q = Queries(AsyncpgDriver(conn))

    def close() -> None:
        loop.run_until_complete(conn.close())
        loop.close()

    prod = Producer(lambda seq: loop.run_until_complete(q.enqueue("noop", str(seq).encode())),
                    close)
    return pgqueuer_idle, {"dsn": dsn}, prod, dsn


def _celery(env: Env, redis_url: str, n: int) -> tuple[Any, dict[str, Any], Producer, str]:
    cfg = {"redis_url": redis_url, "prefix": f"bench9:{uuid.uuid4().hex[:6]}:",
           "queue": "bench9", "pickup": True}
    app = peers._celery_app(cfg)
    producer = app.producer_or_acquire().__enter__()

    def create(seq: int) -> None:
        app.send_task("noop", args=(seq,), queue=cfg["queue"], producer=producer)

    def close() -> None:
        producer.release()
        app.close()

    return peers.celery_worker, cfg, Producer(create, close), ""


SYSTEMS: dict[str, Any] = {"autonomy": _autonomy, "pgqueuer": _pgqueuer, "celery": _celery}


# --- measuring ------------------------------------------------------------------------


def _xacts(env: Env, url: str) -> int | None:
    if not url:
        return None
    name = sa.engine.make_url(url).database
    with env._admin.connect() as c:
        c.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return int(c.execute(sa.text(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
            {"d": name}).scalar_one())


def _redis_cmds(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def _settle(env: Env, url: str, *, limit_s: float) -> None:
    """Until the fleet's database traffic comes down to an idle fleet's (<= 1
    transaction/s over 3 s) or ``limit_s`` passed: every worker's first claims are done."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        x0, t0 = _xacts(env, url), time.monotonic()
        time.sleep(3.0)
        x1 = _xacts(env, url)
        if x0 is None or x1 is None or (x1 - x0) / (time.monotonic() - t0) <= 1.0:
            return


def one(env: Env, redis_url: str, system: str, n: int, *, idle_s: float, samples: int
        ) -> dict[str, Any]:
    target, cfg, prod, url = SYSTEMS[system](env, redis_url, n)
    threads = system in ("autonomy", "pgqueuer")
    per = PER_PROCESS_1000 if n >= 1000 else PER_PROCESS
    procs = math.ceil(n / per) if threads else n
    fleets = []
    left = n
    for _ in range(procs):  # processes of up to ``per`` threads each
        k = min(per, left) if threads else 1
        left -= k
        fleets.append({**cfg, "threads": k})
    fleet = Fleet(target, cfg, procs, cfgs=fleets)
    rc = redis.Redis.from_url(redis_url)
    try:
        fleet.start(timeout_s=600)
        fleet.go()
        # settle: every worker's first claim found nothing, and the backends have reported
        # those start-up transactions (PostgreSQL 15+ flushes an idle backend's statistics
        # up to 10 s late, which would bill them to the idle window)
        time.sleep(min(SETTLE_S, idle_s))
        if system == "autonomy":  # a large fleet's start-up outlasts that on a busy box
            _settle(env, url, limit_s=max(0.0, min(60.0, idle_s)))
        x0, r0, t0 = _xacts(env, url), _redis_cmds(rc), time.monotonic()
        time.sleep(idle_s)
        x1, r1, t1 = _xacts(env, url), _redis_cmds(rc), time.monotonic()
        lat = []
        for seq in range(min(samples, len(fleet.shared.started))):
            fleet.shared.created[seq] = time.perf_counter() * 1000
            prod.create(seq)
            deadline = time.monotonic() + 10
            while fleet.shared.started[seq] == 0 and time.monotonic() < deadline:
                time.sleep(0.0005)
            if fleet.shared.started[seq]:
                lat.append(fleet.shared.started[seq] - fleet.shared.created[seq])
            time.sleep(0.02)  # the worker goes back to waiting
        fleet.stop()
    finally:
        fleet.kill()
        prod.close()
        rc.close()
    lat.sort()
    cmds = max(0, r1 - r0 - 1)  # less the second INFO (the first counts before it)
    return {"workers": n, "processes": procs, "samples": len(lat),
            "p50Ms": round(statistics.median(lat), 2) if lat else None,
            "p99Ms": round(lat[min(len(lat) - 1, math.ceil(len(lat) * 0.99) - 1)], 2)
            if lat else None,
            "idlePgXactsPerS": round((x1 - x0) / (t1 - t0), 2) if x0 is not None
            and x1 is not None else None,
            "idleRedisCmdsPerS": round(cmds / (t1 - t0), 2),
            "idleRedisCmdsPerWaiterS": round(cmds / (t1 - t0) / n, 4)}


def measure(env: Env, *, sizes: tuple[int, ...], idle_s: float, samples: int,
            systems: tuple[str, ...] = ("autonomy", "pgqueuer", "celery"),
            skip: Callable[[str, int], str | None] = lambda s, n: None) -> dict[str, Any]:
    from tests.servers import ThrowawayRedis

    server = ThrowawayRedis()
    out: dict[str, Any] = {}
    try:
        for n in sizes:
            for s in systems:
                why = skip(s, n)
                if why:
                    out.setdefault(s, {})[n] = {"skipped": why}
                    continue
                got = one(env, server.url, s, n, idle_s=idle_s, samples=samples)
                out.setdefault(s, {})[n] = got
                print(f"[bench 9]     {s} x{n}: {got}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return out


def _skip(system: str, n: int) -> str | None:
    if system != "autonomy" and n > 200:
        return "peers at 1 and 50 only"
    if system == "pgqueuer" and n > 60:
        return "one PostgreSQL connection per worker: past the shared server's 100"
    if system == "celery" and n > 60 and not os.environ.get("BENCH_CELERY_200"):
        return "200 solo processes: set BENCH_CELERY_200=1"
    return None


def table(got: dict[str, Any], sizes: tuple[int, ...]) -> str:
    """The markdown table of docs/benchmarks.md: each size, autonomy beside its peers."""
    lines = ["| idle workers | system | processes | pickup p50 | pickup p99 "
             "| idle Redis cmds/s per waiter | idle Redis cmds/s | idle PG xacts/s (total) |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v}{unit}"

    for n in sizes:
        for s in ("autonomy", "pgqueuer", "celery"):
            r = got.get(s, {}).get(n)
            if r is None or "skipped" in r:
                continue
            lines.append(
                f"| {n} | {s} | {r['processes']} | {cell(r['p50Ms'], ' ms')} "
                f"| {cell(r['p99Ms'], ' ms')} | {r['idleRedisCmdsPerWaiterS']} "
                f"| {r['idleRedisCmdsPerS']} | {cell(r['idlePgXactsPerS'])} |")
    return "\n".join(lines)


def run(env: Env) -> list[Row]:
    sizes = (1, 50, 200, 1000) if not env.quick else (1, 3)
    load = os.getloadavg()
    got = measure(env, sizes=sizes, idle_s=env.size(60, 3), samples=env.size(100, 5),
                  skip=_skip)
    print(f"[bench 9] loadavg before {load}, after {os.getloadavg()}\n"
          + table(got, sizes), file=sys.stderr, flush=True)
    details = {"table": got, "loadavgBefore": load, "loadavgAfter": os.getloadavg()}
    rows = []
    for n in sizes:
        a = got["autonomy"][n]
        p = got["pgqueuer"].get(n, {})
        base = p.get("p50Ms") or 0.0
        rows.append(Row(
            bench=9, what=f"pickup p50, {n} idle workers: autonomy vs pgqueuer",
            figure=a["p50Ms"] or float("nan"), unit="ms", baseline=base,
            baseline_what="pgqueuer, same run" if base else "pgqueuer not run",
            target="report",
            extra_ok=(a["p50Ms"] or 99) <= 5 and (a["p99Ms"] or 999) <= 20
            and (a["idlePgXactsPerS"] or 0) <= 1 and a["idleRedisCmdsPerWaiterS"] <= 0.2,
            extra_target=f"p50 <= 5 ms ({a['p50Ms']}), p99 <= 20 ms ({a['p99Ms']}), "
                         f"idle xacts <= 1/s ({a['idlePgXactsPerS']}), idle Redis <= 0.2 "
                         f"cmds/s per waiter ({a['idleRedisCmdsPerWaiterS']})",
            details=details if n == sizes[0] else {}))
    return rows
