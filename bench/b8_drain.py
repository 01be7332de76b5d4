"""Bench 8 (issue 13 a): drain 5,000 no-op tasks from one queue with 1 and 8 worker
processes -- autonomy (``LaneWorker``, one lane, ``max_in_flight`` = workers) beside
pgqueuer (batch size 1, and its default 10), procrastinate and Celery (Redis broker,
``--pool=solo`` per process), all in the same run on the same servers.

Rounds are interleaved (every system once per round) and the median of the rounds is
reported, so the machine's drifting load hits every system alike. Each drain is checked
exactly-once twice over: the handlers ran exactly as many times as there were jobs, each
job once (``bench.fleet``); for autonomy also by the database: every task ``done`` with
one ``task_completed`` event and one ``lease_granted`` event.

Targets: autonomy with 8 workers >= pgqueuer batch-1 with 8, >= procrastinate with 8,
and >= 2x autonomy with 1. Celery is reported beside.

"autonomy batched" (issue 22) is the same drain with ``LaneWorker(prefetch=10)``: each
worker holds 10 leases and completes them in one ``complete_many`` that hands over the
next 10. Every drain also says what it cost per task (``bench.fleet.drain``: worker CPU,
PostgreSQL CPU and commits). ``BENCH8_SYSTEMS`` (comma-separated names) and
``BENCH8_PROCS`` (e.g. ``8``) run a subset: then a row per system beside autonomy
batched.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from app.clock import utcnow
from app.ops import lane_control
from app.workers.prefetch import AUTO_MAX
from bench import peers
from bench.common import Env, Row
from bench.fleet import drain
from bench.seed import analyze, seed_todo

SYSTEMS = ("autonomy", "autonomy batched", "pgqueuer b1", "pgqueuer b10", "procrastinate",
           "celery")
# the batched mode's prefetch: pgqueuer's default batch size (issue 22)
PREFETCH = 10
# the batched lane's max_in_flight: this many times every worker's K (room to spare, so a
# claim need not race the others for the last free slots; 1 was not measurably different)
HEADROOM = int(os.environ.get("BENCH8_HEADROOM") or 2)


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _autonomy(env: Env, jobs: int, procs: int) -> dict[str, Any]:
    return _autonomy_run(env, jobs, procs, prefetch=1)


def _autonomy_batched(env: Env, jobs: int, procs: int) -> dict[str, Any]:
    """Each worker a prefetch of ``PREFETCH`` leases (``LaneWorker(prefetch=K)``): K
    granted in one claim, the successes completed in one ``complete_many`` that hands
    over the next K. The lane allows every worker its K (``max_in_flight`` counts each
    lease)."""
    return _autonomy_run(env, jobs, procs, prefetch=PREFETCH)


def _autonomy_auto(env: Env, jobs: int, procs: int) -> dict[str, Any]:
    """Each worker ``LaneWorker(prefetch="auto")``: K follows the handler's run time (a
    no-op's: the cap, ``AUTO_MAX``), in a lane with room for every worker's cap."""
    return _autonomy_run(env, jobs, procs, prefetch="auto")


def lane_room(procs: int, prefetch: int) -> int:
    """The drain lane's ``max_in_flight``: a lease per worker, or with a prefetch every
    worker its K with ``HEADROOM`` to spare."""
    procs = max(procs, 1)
    return procs * prefetch * HEADROOM if prefetch > 1 else procs


def _autonomy_run(env: Env, jobs: int, procs: int, *, prefetch: int | str) -> dict[str, Any]:
    url = env.pg_database()
    ctx = env.context(url)
    lane = "drain"
    try:
        lane_control.configure_lane(ctx, assignee=lane, max_in_flight=lane_room(
            procs, AUTO_MAX if prefetch == "auto" else int(prefetch)),
                                    actor="bench")
        seed_todo(ctx.engine, assignee=lane, n=jobs, now=utcnow())
        analyze(ctx.engine)
        settings = env.settings(url).model_dump()
        settings["api_token"] = None
        got = drain(peers.autonomy_worker, {"settings": settings, "lane": lane,
                                            "worker_kw": {"prefetch": prefetch}},
                    procs=procs, jobs=jobs, pg_dsn=_dsn(url))
        got["db"] = _autonomy_db_check(ctx.engine, lane)
        got["db"]["ok"] = got["db"]["ok"] and got["db"]["done"] == jobs
        got["exactlyOnce"] = got["exactlyOnce"] and got["db"]["ok"]
        return got
    finally:
        ctx.close()


def _autonomy_db_check(engine: sa.Engine, lane: str) -> dict[str, Any]:
    with engine.connect() as c:
        row = c.execute(sa.text(
            "SELECT (SELECT count(*) FROM task WHERE assignee = :l AND status = 'done'),"
            " (SELECT count(*) FROM task WHERE assignee = :l AND status <> 'done'),"
            " (SELECT count(*) FROM (SELECT task_id FROM event WHERE assignee = :l AND"
            "   kind = 'task_completed' GROUP BY task_id HAVING count(*) <> 1) s),"
            " (SELECT count(*) FROM (SELECT task_id FROM event WHERE assignee = :l AND"
            "   kind = 'lease_granted' GROUP BY task_id HAVING count(*) <> 1) s)"),
            {"l": lane}).one()
    done, left, bad_completes, bad_grants = (int(x) for x in row)
    return {"done": done, "notDone": left, "tasksNotCompletedOnce": bad_completes,
            "tasksNotGrantedOnce": bad_grants,
            "ok": left == 0 and bad_completes == 0 and bad_grants == 0}


def _pg_peer_db(env: Env, stem: str) -> str:
    return env._url_for(env._create_db(stem)).replace("postgresql+psycopg://",
                                                      "postgresql://")


def _pgqueuer(batch_size: int) -> Callable[[Env, int, int], dict[str, Any]]:
    def run(env: Env, jobs: int, procs: int) -> dict[str, Any]:
        dsn = _pg_peer_db(env, "bench_pgqueuer")
        asyncio.run(peers.pgqueuer_setup(dsn))
        asyncio.run(peers.pgqueuer_enqueue(dsn, jobs))
        return drain(peers.pgqueuer_worker, {"dsn": dsn, "batch_size": batch_size},
                     procs=procs, jobs=jobs, pg_dsn=dsn)
    return run


def _procrastinate(env: Env, jobs: int, procs: int) -> dict[str, Any]:
    dsn = _pg_peer_db(env, "bench_procrastinate")
    peers.procrastinate_setup(dsn)
    peers.procrastinate_enqueue(dsn, jobs)
    return drain(peers.procrastinate_worker, {"dsn": dsn}, procs=procs, jobs=jobs,
                 pg_dsn=dsn)


def _celery(env: Env, jobs: int, procs: int) -> dict[str, Any]:
    cfg = {"redis_url": env.redis_url, "prefix": f"{env.prefix}celery8:{uuid.uuid4().hex[:6]}:",
           "queue": "bench8"}
    try:
        peers.celery_enqueue(cfg, jobs)
        return drain(peers.celery_worker, cfg, procs=procs, jobs=jobs)
    finally:
        env.delete_prefix(cfg["prefix"])


RUNNERS: dict[str, Callable[[Env, int, int], dict[str, Any]]] = {
    "autonomy": _autonomy, "autonomy batched": _autonomy_batched,
    "autonomy auto": _autonomy_auto,
    "pgqueuer b1": _pgqueuer(1), "pgqueuer b10": _pgqueuer(10),
    "procrastinate": _procrastinate, "celery": _celery,
}


def measure(env: Env, *, jobs: int, rounds: int, systems: tuple[str, ...] = SYSTEMS,
            procs_list: tuple[int, ...] = (1, 8)) -> dict[str, Any]:
    """``{system: {procs: {"median": tasks/s, "runs": [...]}}}``, rounds interleaved."""
    seen: dict[str, dict[int, list[dict[str, Any]]]] = {
        s: {p: [] for p in procs_list} for s in systems}
    for _ in range(rounds):
        for procs in procs_list:
            for s in systems:
                got = RUNNERS[s](env, jobs, procs)
                seen[s][procs].append(got)
                print(f"[bench 8]     {s} x{procs}: {got['throughput']:.0f} tasks/s, "
                      f"exactly once: {got['exactlyOnce']}, per task {got['cost']}",
                      file=sys.stderr, flush=True)
    return {s: {p: {"median": statistics.median(r["throughput"] for r in runs),
                    "exactlyOnce": all(r["exactlyOnce"] for r in runs), "runs": runs,
                    "cost": {k: statistics.median(r["cost"][k] for r in runs)
                             for k in runs[0]["cost"]}}
                for p, runs in by.items()} for s, by in seen.items()}


def run(env: Env) -> list[Row]:
    jobs = env.size(5_000, 200)
    rounds = int(os.environ.get("BENCH8_ROUNDS") or env.size(3, 1))
    load = os.getloadavg()
    systems = tuple(x.strip() for x in os.environ["BENCH8_SYSTEMS"].split(",")) \
        if os.environ.get("BENCH8_SYSTEMS") else SYSTEMS
    procs_list = tuple(int(x) for x in os.environ["BENCH8_PROCS"].split(",")) \
        if os.environ.get("BENCH8_PROCS") else (1, 8)
    got = measure(env, jobs=jobs, rounds=rounds, systems=systems, procs_list=procs_list)
    if set(systems) != set(SYSTEMS) or 1 not in procs_list:
        return _batch_rows(got, jobs=jobs, rounds=rounds, load=load)
    a1, a8 = got["autonomy"][1]["median"], got["autonomy"][8]["median"]
    once = {s: all(v["exactlyOnce"] for v in by.values()) for s, by in got.items()}
    table = {s: {str(p): round(v["median"], 1) for p, v in by.items()}
             for s, by in got.items()}
    details = {"table": table, "exactlyOnce": once, "loadavgBefore": load,
               "loadavgAfter": os.getloadavg(), "jobs": jobs, "rounds": rounds,
               "runs": {s: {str(p): [{k: v for k, v in r.items() if k != "db"} | (
                   {"db": r["db"]} if "db" in r else {}) for r in v["runs"]]
                   for p, v in by.items()} for s, by in got.items()}}
    ok = all(once.values())
    rows = [
        Row(bench=8, what=f"drain {jobs:,}: autonomy 8 workers vs pgqueuer batch 1, 8 workers",
            figure=a8, unit="tasks/s", baseline=got["pgqueuer b1"][8]["median"],
            baseline_what="pgqueuer batch 1, 8 workers, same run", target=">= 1.0",
            extra_ok=ok, extra_target="every system exactly once", details=details),
        Row(bench=8, what=f"drain {jobs:,}: autonomy 8 workers vs procrastinate, 8 workers",
            figure=a8, unit="tasks/s", baseline=got["procrastinate"][8]["median"],
            baseline_what="procrastinate, 8 workers, same run", target=">= 1.0"),
        Row(bench=8, what=f"drain {jobs:,}: autonomy 8 workers vs 1 worker",
            figure=a8, unit="tasks/s", baseline=a1, baseline_what="autonomy, 1 worker",
            target=">= 2.0"),
        Row(bench=8, what=f"drain {jobs:,}: autonomy 8 workers vs Celery (solo), 8 workers",
            figure=a8, unit="tasks/s", baseline=got["celery"][8]["median"],
            baseline_what="Celery, Redis broker, --pool=solo x 8", target="report"),
    ]
    return rows


def _batch_rows(got: dict[str, Any], *, jobs: int, rounds: int,
                load: tuple[float, float, float]) -> list[Row]:
    """A run of some systems at 8 workers (``BENCH8_SYSTEMS``, ``BENCH8_PROCS=8``: issue
    22's comparison): each system's median beside autonomy batched's, with the per-task
    costs."""
    table = {s: {str(p): {"tasksPerS": round(v["median"], 1), **v["cost"]}
                 for p, v in by.items()} for s, by in got.items()}
    details = {"table": table, "loadavgBefore": load, "loadavgAfter": os.getloadavg(),
               "jobs": jobs, "rounds": rounds,
               "exactlyOnce": {s: all(v["exactlyOnce"] for v in by.values())
                               for s, by in got.items()},
               "runs": {s: {str(p): [r["throughput"] for r in v["runs"]]
                            for p, v in by.items()} for s, by in got.items()}}
    mine = got.get("autonomy batched", {}).get(8, {}).get("median", 0.0)
    rows = []
    for s, by in got.items():
        if s == "autonomy batched" or 8 not in by:
            continue
        rows.append(Row(bench=8, what=f"drain {jobs:,}: autonomy batched (prefetch "
                        f"{PREFETCH}) 8 workers vs {s}, 8 workers", figure=mine,
                        unit="tasks/s", baseline=by[8]["median"],
                        baseline_what=f"{s}, 8 workers, same run", target=">= 1.0",
                        details=details if not rows else {}))
    return rows
