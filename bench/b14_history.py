"""Bench 14 (issue 21 item 8): does the claim + complete cycle stay flat as finished
history grows, and does the retention job leave claims their latency while it prunes?

(a) History. Two PostgreSQL databases from one template, the same bench lane and backlog
in each; one also holds 1,000,000 finished tasks (``--quick``: 20,000) with one
``task_completed`` event each, seeded set-based (one ``INSERT ... SELECT`` over
``generate_series`` for the tasks, one for their events), half of them in the bench lane
itself, the rest over 20 other lanes, spread over 30 days, then ``VACUUM ANALYZE``. One
worker (``lanes.claim`` + ``lanes.complete``, one process) runs rounds of cycles on each
database in turn, so the machine's load drifts over both alike; each cycle is timed.
Figures: per-cycle p50 and p99 and cycles/s with history against the same without.
Target: p50, p99 and throughput flat within 1.5x.

(b) Retention. On the database with history (~77 % of it older than the default
retention of 7 days), rounds of cycles alternate between the retention job idle and the
retention job pruning (``jobs.run_job(ctx, "retention")`` in a loop, in a process of its
own like a Celery worker, with the settings' batch size), in the same run. Figure: claim +
complete p99 while it prunes, against p99 while it does not; the batch size and what was
pruned during the measured rounds are in the row. On two shared cores the pruning process
also takes CPU from the claiming one, so the ratio is an upper bound of the lock cost.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import statistics
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app.clock import utcnow
from app.ops import lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from bench.common import Env, Row
from bench.seed import _at, _now_param, analyze, explain, seed_todo

LANE = "b14"
HISTORY_LANES = 20


def seed_history_with_events(engine: Engine, *, n: int, now: Any) -> None:
    """``n`` finished tasks (done; 1 in 50 cancelled, 1 in 50 dead), half in the bench lane,
    over 30 days, each with one ``task_completed`` event: two set-based statements."""
    hours = "(g % 720) + 1"
    created, finished = _at(engine, f"{hours} + 1"), _at(engine, hours)
    lane = f"CASE WHEN g % 2 = 0 THEN '{LANE}' ELSE 'lane' || CAST(g % {HISTORY_LANES} AS TEXT) END"
    status = ("CASE WHEN g % 50 = 0 THEN 'cancelled' WHEN g % 50 = 1 THEN 'dead' "
              "ELSE 'done' END")
    with engine.begin() as c:
        c.execute(sa.text(
            "INSERT INTO task (title, assignee, kind, status, priority, payload, attempts, "
            "claimed_by, lease_token, lease_expires_at, lane_paused, created_at, updated_at, "
            "completed_at) "
            f"SELECT 'history ' || CAST(g AS TEXT), {lane}, 'work', {status}, g % 5, '{{}}', "
            "1, 'w' || CAST(g % 97 AS TEXT), NULL, NULL, false, "
            f"{created}, {finished}, {finished} "
            "FROM generate_series(1, CAST(:n AS integer)) AS s(g)"),
            {"n": n, "now": _now_param(engine, now)})
        c.execute(sa.text(
            "INSERT INTO event (at, kind, assignee, task_id, actor, data) "
            "SELECT t.updated_at, 'task_completed', t.assignee, t.id, t.claimed_by, '{}' "
            "FROM task t WHERE t.status IN ('done', 'cancelled', 'dead')"))


def cycle(ctx: Context, worker: str = "b14w") -> None:
    got = lanes.claim(ctx, assignee=LANE, worker=worker)
    assert got.get("lease") and not got.get("guard"), got
    lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                   outcome="success")


def timed_round(ctx: Context, n: int) -> tuple[list[float], float]:
    """``n`` cycles: each one's seconds, and the round's wall seconds."""
    times = []
    t_start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        cycle(ctx)
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - t_start


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def summary(times: list[float], wall: float) -> dict[str, float]:
    return {"p50Ms": statistics.median(times) * 1000, "p99Ms": pct(times, 99) * 1000,
            "cyclesPerS": len(times) / wall, "cycles": len(times)}


def prepare(env: Env, *, backlog: int) -> Context:
    url = env.pg_database()
    ctx = env.context(url)
    with transaction(ctx.engine) as conn:
        store.ensure_lane(conn, assignee=LANE, now=utcnow(), max_in_flight=1)
    seed_todo(ctx.engine, assignee=LANE, n=backlog, now=utcnow())
    return ctx


def claim_plan(ctx: Context) -> str:
    """The plan of the claim's pick (the statement ``autonomy_claim`` runs), as run."""
    return explain(ctx.engine,
                   "SELECT t.id FROM task t WHERE t.assignee = :a AND t.status = 'todo' "
                   "AND (t.not_before IS NULL OR t.not_before <= now()) "
                   "ORDER BY t.priority DESC, t.created_at, t.id LIMIT 1 "
                   "FOR UPDATE SKIP LOCKED", {"a": LANE})


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text(sql)).scalar_one())


# --- (b): the retention job in a process of its own ------------------------------------


def _retention_loop(settings: dict[str, Any], go: Any, stop: Any, ready: Any, busy: Any,
                    pruned: Any, runs: Any, run_ms: Any) -> None:
    """The child: run the retention job back to back while ``go`` is set."""
    from app.ops.checks import jobs
    from app.settings import Settings

    ctx = Context.from_settings(Settings(**settings))
    ready.set()
    try:
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            busy.value = 1
            try:
                got = jobs.run_job(ctx, "retention")
            finally:
                busy.value = 0
            with pruned.get_lock():
                pruned.value += int((got.get("pruned") or {}).get("tasks", 0))
                runs.value += 1
                run_ms.value += float(got.get("durationMs") or 0)
    finally:
        ctx.close()


def _pause(go: Any, busy: Any, child: Any) -> None:
    """Stop the retention loop and wait for its run in flight to end."""
    go.clear()
    while busy.value and child.is_alive():
        time.sleep(0.005)


class WaitSampler:
    """What the database's other sessions wait on, sampled every 20 ms from
    ``pg_stat_activity``, tallied under the phase set in ``phase`` ("on"/"off")."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.phase = engine, "off"
        self.seen: dict[str, collections.Counter[str]] = {
            "on": collections.Counter(), "off": collections.Counter()}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.engine.connect() as c:
            while not self.stop.wait(0.02):
                rows = c.exec_driver_sql(
                    "SELECT coalesce(wait_event_type, 'CPU'), coalesce(wait_event, '-'), "
                    "left(query, 30) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND pid <> pg_backend_pid() AND state = 'active'"
                ).all()
                c.rollback()
                for wtype, wevent, query in rows:
                    who = "claims" if not query.startswith(("DELETE", "SELECT task.id")) \
                        else "retention"
                    self.seen[self.phase][f"{who} {wtype}:{wevent}"] += 1

    def lock_waits(self, phase: str) -> int:
        """Samples of a claim or complete waiting on a heavyweight lock."""
        return sum(v for k, v in self.seen[phase].items() if k.startswith("claims Lock:"))


def retention_rounds(env: Env, ctx: Context, *, n: int, rounds: int) -> dict[str, Any]:
    s = ctx.settings
    spawn = mp.get_context("spawn")
    go, stop, ready = spawn.Event(), spawn.Event(), spawn.Event()
    busy, pruned = spawn.Value("i", 0), spawn.Value("q", 0)
    runs, run_ms = spawn.Value("q", 0), spawn.Value("d", 0.0)
    child = spawn.Process(target=_retention_loop, daemon=True, args=(
        {"database_url": s.database_url, "redis_url": s.redis_url,
         "redis_prefix": s.redis_prefix, "retention_batch": s.retention_batch,
         "retention_max_batches": s.retention_max_batches,
         "retention_finished_s": s.retention_finished_s},
        go, stop, ready, busy, pruned, runs, run_ms))
    child.start()
    on: list[float] = []
    off: list[float] = []
    on_wall = off_wall = 0.0
    waits = WaitSampler(ctx.engine)
    try:
        assert ready.wait(120) and child.is_alive(), "the retention process did not start"
        waits.thread.start()
        for _ in range(rounds):
            t, w = timed_round(ctx, n)
            off += t
            off_wall += w
            waits.phase = "on"
            go.set()
            t, w = timed_round(ctx, n)
            _pause(go, busy, child)
            waits.phase = "off"
            on += t
            on_wall += w
        assert child.is_alive(), "the retention process died"
    finally:
        waits.stop.set()
        if waits.thread.is_alive():
            waits.thread.join(10)
        stop.set()
        go.set()
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
    return {"on": summary(on, on_wall), "off": summary(off, off_wall),
            "prunedDuringMeasuredRounds": pruned.value, "retentionRuns": runs.value,
            "msPerRetentionRun": run_ms.value / runs.value if runs.value else None,
            "finishedLeft": count(ctx.engine, "SELECT count(*) FROM task WHERE status IN "
                                  "('done', 'cancelled', 'dead')"),
            "batch": s.retention_batch, "maxBatchesPerRun": s.retention_max_batches,
            "claimLockWaitsWhilePruning": waits.lock_waits("on"),
            "claimLockWaitsIdle": waits.lock_waits("off"),
            "waitSamplesWhilePruning": dict(waits.seen["on"].most_common(12)),
            "waitSamplesIdle": dict(waits.seen["off"].most_common(12))}


def run(env: Env) -> list[Row]:
    history = env.size(1_000_000, 20_000)
    n, rounds = env.size(300, 50), env.size(5, 2)
    backlog = n * rounds * 4 + 20
    empty, full = prepare(env, backlog=backlog), prepare(env, backlog=backlog)
    try:
        t0 = time.perf_counter()
        seed_history_with_events(full.engine, n=history, now=utcnow())
        seed_s = time.perf_counter() - t0
        events = count(full.engine, "SELECT count(*) FROM event")
        analyze(empty.engine)
        analyze(full.engine)
        for c in (empty, full):
            cycle(c)  # warm: scripts loaded, statements compiled, pool filled
        times: dict[str, list[float]] = {"empty": [], "full": []}
        walls = {"empty": 0.0, "full": 0.0}
        for _ in range(rounds):
            for name, c in (("empty", empty), ("full", full)):
                t, w = timed_round(c, n)
                times[name] += t
                walls[name] += w
        e, f = summary(times["empty"], walls["empty"]), summary(times["full"], walls["full"])
        details: dict[str, Any] = {
            "history": history, "historyEvents": events,
            "seedSeconds": round(seed_s, 1), "cyclesPerRound": n, "rounds": rounds,
            "withHistory": f, "withoutHistory": e, "claimPlanWithHistory": claim_plan(full)}
        label = f"{history:,} finished tasks (+1 event each)"
        rows = [
            Row(bench=14, what=f"claim+complete p50 with {label}, 1 worker, PostgreSQL",
                figure=f["p50Ms"], unit="ms", baseline=e["p50Ms"],
                baseline_what="same, 0 finished tasks", target="<= 1.5", details=details),
            Row(bench=14, what=f"claim+complete p99 with {label}, 1 worker, PostgreSQL",
                figure=f["p99Ms"], unit="ms", baseline=e["p99Ms"],
                baseline_what="same, 0 finished tasks", target="<= 1.5"),
            # throughput: the baseline over the figure, so "flat within 1.5x" reads <= 1.5
            Row(bench=14, what=f"claim+complete s/1000 cycles with {label}, 1 worker "
                f"({f['cyclesPerS']:.1f} vs {e['cyclesPerS']:.1f} cycles/s)",
                figure=1000 / f["cyclesPerS"], unit="s", baseline=1000 / e["cyclesPerS"],
                baseline_what="same, 0 finished tasks", target="<= 1.5"),
        ]
        r = retention_rounds(env, full, n=n, rounds=rounds)
        rows.append(Row(
            bench=14, what=f"claim+complete p99 while retention prunes (batch {r['batch']}, "
            f"{r['prunedDuringMeasuredRounds']:,} tasks pruned meanwhile), PostgreSQL",
            figure=r["on"]["p99Ms"], unit="ms", baseline=r["off"]["p99Ms"],
            baseline_what="same lane and history, retention idle", target="<= 2",
            details=r, extra_ok=r["claimLockWaitsWhilePruning"] == 0,
            extra_target="claims waiting on a lock while it prunes = 0 (got "
            f"{r['claimLockWaitsWhilePruning']} of "
            f"{sum(r['waitSamplesWhilePruning'].values())} samples)"))
        rows.append(Row(
            bench=14, what="claim+complete p50 while retention prunes, PostgreSQL",
            figure=r["on"]["p50Ms"], unit="ms", baseline=r["off"]["p50Ms"],
            baseline_what="same lane and history, retention idle", target="report"))
        return rows
    finally:
        empty.close()
        full.close()
