"""Bench 5: ``build_status``, readiness and handoff with 1,000 vs 1,000,000 tasks (and 100
vs 100,000 failure-log rows), on PostgreSQL.

One database grows: first a fleet of 1,000 tasks (20 lanes, 200 queued, 20 leased, the
rest finished history over 30 days) and 100 failure-log rows; then the history grows to
1,000,000 tasks and the log to 100,000 rows while the live part (lanes, queue, leases,
run-locks, check state) stays the same -- the fleet's past grows, its present does not.
Seeding is set-based; statistics are refreshed after each load.

Per check: median latency (figure at 1,000,000; baseline at 1,000; target <= 3x) and the
tracemalloc peak of one call (target <= 1.2x). The plans of every read each check sends are
captured at both sizes (JSON details; ``docs/benchmarks.md``).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

from app.clock import utcnow
from app.ops.checks import handoff, readiness
from app.ops.checks.status import build_status
from app.storage import locks
from app.storage.context import Context
from bench.common import Env, Row, latency_s
from bench.plans import plans_of
from bench.seed import analyze, seed_active, seed_fingerprints, seed_history

LANES, TODO, LEASED = 20, 200, 20
JOBS = ("status", "readiness", "handoff_health", "self_heal")


def checks(ctx: Context) -> dict[str, Callable[[], Any]]:
    return {"build_status": lambda: build_status(ctx),
            "readiness": lambda: readiness.run_readiness(ctx),
            "handoff": lambda: handoff.run_handoff(ctx)}


def peak_bytes(fn: Callable[[], Any]) -> int:
    """tracemalloc peak of one call (allocations made during the call only)."""
    fn()  # warm: imports, compiled statements, scripts
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _measure(ctx: Context, calls: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name, fn in checks(ctx).items():
        out[name] = {"latencyS": latency_s(fn, calls), "peakBytes": peak_bytes(fn),
                     "plans": plans_of(ctx.engine, fn)}
    return out


def measure(env: Env, url: str, *, small: int, big: int, ffl_small: int, ffl_big: int,
            calls: int) -> dict[str, Any]:
    ctx = env.context(url)
    tokens = []
    try:
        now = utcnow()
        seed_active(ctx.engine, todo=TODO, in_progress=LEASED, lanes=LANES, now=now)
        history = small - TODO - LEASED
        seed_history(ctx.engine, lo=1, hi=history, lanes=LANES, now=now)
        seed_fingerprints(ctx.engine, lo=1, hi=ffl_small, distinct=2_000, now=now)
        analyze(ctx.engine)
        for job in JOBS:  # a few run-locks held, the same at both sizes
            tokens.append((job, locks.acquire(ctx, f"bench-{job}", budget_ms=60_000)))
        at_small = _measure(ctx, calls)
        seed_history(ctx.engine, lo=history + 1, hi=big - TODO - LEASED, lanes=LANES, now=now)
        seed_fingerprints(ctx.engine, lo=ffl_small + 1, hi=ffl_big, distinct=2_000, now=now)
        analyze(ctx.engine)
        at_big = _measure(ctx, calls)
        return {"small": at_small, "big": at_big}
    finally:
        for job, token in tokens:
            if token:
                locks.release(ctx, f"bench-{job}", token)
        ctx.close()


def run(env: Env) -> list[Row]:
    small, big = 1_000, env.size(1_000_000, 5_000)
    ffl_small, ffl_big = 100, env.size(100_000, 500)
    calls = env.size(30, 3)
    got = measure(env, env.pg_database(), small=small, big=big, ffl_small=ffl_small,
                  ffl_big=ffl_big, calls=calls)
    rows = []
    for name in ("build_status", "readiness", "handoff"):
        s, b = got["small"][name], got["big"][name]
        mem_ratio = b["peakBytes"] / max(s["peakBytes"], 1)
        rows.append(Row(
            bench=5, what=f"{name} at {big:,} tasks + {ffl_big:,} log rows, PostgreSQL",
            figure=b["latencyS"] * 1000, unit="ms", baseline=s["latencyS"] * 1000,
            baseline_what=f"same at {small:,} tasks + {ffl_small:,} log rows", target="<= 3",
            extra_ok=mem_ratio <= 1.2,
            extra_target=(f"peak mem {b['peakBytes'] / 1024:.0f} KiB vs "
                          f"{s['peakBytes'] / 1024:.0f} KiB = {mem_ratio:.2f}× (≤ 1.2×)"),
            details={"calls": calls, "peakBytes": {"small": s["peakBytes"],
                                                   "big": b["peakBytes"]},
                     "memRatio": mem_ratio,
                     "plans": {"small": s["plans"], "big": b["plans"]}}))
    return rows
