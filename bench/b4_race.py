"""Bench 4: 8 processes racing claim + complete on one PostgreSQL lane (10,000 tasks),
against the same lane work done by 1 process.

Each process is a separate worker (its own engine, Redis client and worker name); the lane
allows as many live leases as there are workers. The clock starts when every process is
connected and waiting, so start-up is not counted. Duplicates are counted twice over: a
task id completed by two workers, and a task granted more than one lease in the audit
trail (``lease_granted`` events). Target: throughput >= 1.0x the 1-process figure, 0 dups.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import sqlalchemy as sa

from app.clock import utcnow
from app.errors import AutonomyError
from app.ops import lane_control, lanes
from app.settings import Settings
from app.storage.context import Context
from app.storage.models import event_table
from bench.common import Env, Row
from bench.seed import analyze, seed_todo

E = event_table


def worker(settings: dict[str, Any], assignee: str, name: str, ready: Any, go: Any,
           out: Any) -> None:
    """Claim and complete until the lane is empty; report ids done and the time taken."""
    ctx = Context.from_settings(Settings(**settings))
    done: list[int] = []
    retries = 0
    try:
        lanes.claim(ctx, assignee="b4-warm", worker=name)  # connect + load scripts
        ready.release()
        go.wait()
        t0 = time.perf_counter()
        while True:
            try:
                got = lanes.claim(ctx, assignee=assignee, worker=name)
                if got.get("task") is None:
                    break
                if got.get("guard"):
                    retries += 1
                    continue
                ans = lanes.complete(ctx, task_id=got["task"]["id"],
                                     lease_token=got["lease"]["token"], outcome="success")
                if not ans.get("guard"):
                    done.append(int(got["task"]["id"]))
            except AutonomyError:
                retries += 1
        out.put({"name": name, "done": done, "start": t0, "end": time.perf_counter(),
                 "retries": retries})
    finally:
        ctx.close()


def sample_waits(ctx: Context, *, out_queue_done: Any, every_s: float = 0.05
                 ) -> dict[str, Any]:
    """While the race runs, sample what the workers' PostgreSQL sessions wait on
    (``pg_stat_activity``): how often a claim queues behind another's row lock."""
    samples, waiting, active = 0, 0, 0
    events: dict[str, int] = {}
    q = sa.text("SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with ctx.engine.connect() as c:
        while not out_queue_done():
            for state, wtype, wevent in c.execute(q):
                if state == "active":
                    active += 1
                    if wtype == "Lock":
                        waiting += 1
                    key = f"{wtype}:{wevent}" if wtype else "cpu"
                    events[key] = events.get(key, 0) + 1
            samples += 1
            c.rollback()
            time.sleep(every_s)
    return {"samples": samples, "activeSessionsAvg": round(active / max(samples, 1), 2),
            "lockWaitingSessionsAvg": round(waiting / max(samples, 1), 2),
            "activeByWait": dict(sorted(events.items(), key=lambda kv: -kv[1])[:6])}


def race(env: Env, url: str, *, assignee: str, procs: int, tasks: int) -> dict[str, Any]:
    ctx = env.context(url)
    try:
        lane_control.configure_lane(ctx, assignee=assignee, max_in_flight=max(procs, 1),
                                    actor="bench")
        seed_todo(ctx.engine, assignee=assignee, n=tasks, now=utcnow())
        analyze(ctx.engine)
        settings = env.settings(url).model_dump()
        settings["api_token"] = None
        mpc = mp.get_context("spawn")
        ready, go, out = mpc.Semaphore(0), mpc.Event(), mpc.Queue()
        ps = [mpc.Process(target=worker, args=(settings, assignee, f"w{i}", ready, go, out))
              for i in range(procs)]
        try:
            for p in ps:
                p.start()
            deadline = time.monotonic() + 120
            started = 0
            while started < len(ps):
                if ready.acquire(timeout=0.5):
                    started += 1
                elif time.monotonic() > deadline or any(p.exitcode for p in ps):
                    raise RuntimeError("a race worker did not start")
            t0 = time.perf_counter()
            go.set()
            waits = sample_waits(ctx, out_queue_done=lambda: out.qsize() >= len(ps))
            results = [out.get(timeout=900) for _ in ps]
            elapsed = max(r["end"] for r in results) - t0
            for p in ps:
                p.join(30)
        finally:
            for p in ps:  # only the processes this benchmark started
                if p.is_alive():
                    p.terminate()
                    p.join(10)
        ids = [i for r in results for i in r["done"]]
        with ctx.engine.connect() as c:
            granted_twice = c.execute(
                sa.select(sa.func.count()).select_from(
                    sa.select(E.c.task_id).where(E.c.kind == "lease_granted",
                                                 E.c.assignee == assignee)
                    .group_by(E.c.task_id).having(sa.func.count() > 1).subquery())
            ).scalar_one()
        return {"throughput": len(ids) / elapsed, "completed": len(ids),
                "duplicates": (len(ids) - len(set(ids))) + int(granted_twice),
                "elapsedS": round(elapsed, 2), "retries": sum(r["retries"] for r in results),
                "waits": waits,
                "perWorker": {r["name"]: len(r["done"]) for r in results}}
    finally:
        ctx.close()


def run(env: Env) -> list[Row]:
    tasks = env.size(10_000, 60)
    url = env.pg_database()
    one = race(env, url, assignee="b4-one", procs=1, tasks=tasks)
    many = race(env, url, assignee="b4-eight", procs=8, tasks=tasks)
    complete = many["completed"] == tasks and one["completed"] == tasks
    return [Row(
        bench=4, what=f"8 processes racing claim+complete, PostgreSQL, {tasks:,} tasks",
        figure=many["throughput"], unit="cycles/s", baseline=one["throughput"],
        baseline_what="same lane work, 1 process", target=">= 1.0",
        extra_ok=many["duplicates"] == 0 and one["duplicates"] == 0 and complete,
        extra_target=f"duplicates = 0 (got {many['duplicates']}), all done",
        details={"eight": many, "one": one})]
