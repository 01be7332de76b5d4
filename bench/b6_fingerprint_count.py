"""Bench 6: ``breaker.fingerprint_count`` with 1,000 vs 1,000,000 failure-log rows.

One database grows from 1,000 to 1,000,000 rows (10,000 distinct fingerprints spread
evenly over 30 days, seeded set-based). The probed fingerprint has the same 3 failures in
the 24 h window (and 2 older ones) at both sizes, so the answer is identical and only the
table around it grows. Figure: median latency at 1,000,000 rows; baseline: the same at
1,000. Target: <= 2x. Plans of the count query at both sizes go to the JSON (and the doc).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app.clock import utcnow
from app.ops import breaker
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from bench.common import Env, Row, latency_s
from bench.plans import plans_of
from bench.seed import analyze, seed_fingerprints

PROBE = "lane0:bench probe <n>"


def _probe_rows(ctx: Context) -> None:
    now = utcnow()
    with transaction(ctx.engine) as conn:
        for hours in (1, 5, 20, 30, 48):  # 3 inside the 24 h window, 2 before it
            store.insert_fingerprint(conn, fingerprint=PROBE, assignee="lane0", reason="probe",
                                     task_id=0, now=now - timedelta(hours=hours))


def _measure(ctx: Context, calls: int) -> dict[str, Any]:
    def count() -> int:
        return breaker.fingerprint_count(ctx, fingerprint=PROBE)

    answer = count()
    return {"latencyS": latency_s(count, calls), "answer": answer,
            "plans": plans_of(ctx.engine, count)}


def measure(env: Env, url: str, *, small: int, big: int, calls: int) -> dict[str, Any]:
    ctx = env.context(url)
    try:
        now = utcnow()
        _probe_rows(ctx)
        seed_fingerprints(ctx.engine, lo=1, hi=small, distinct=10_000, now=now)
        analyze(ctx.engine)
        at_small = _measure(ctx, calls)
        seed_fingerprints(ctx.engine, lo=small + 1, hi=big, distinct=10_000, now=now)
        analyze(ctx.engine)
        at_big = _measure(ctx, calls)
        return {"small": at_small, "big": at_big}
    finally:
        ctx.close()


def run(env: Env) -> list[Row]:
    small, big = 1_000, env.size(1_000_000, 20_000)
    calls = env.size(2_000, 20)
    rows = []
    for backend, url in (("PostgreSQL", env.pg_database()), ("SQLite", env.sqlite_database())):
        got = measure(env, url, small=small, big=big, calls=calls)
        s, b = got["small"], got["big"]
        rows.append(Row(
            bench=6, what=f"breaker.fingerprint_count at {big:,} log rows, {backend}",
            figure=b["latencyS"] * 1000, unit="ms", baseline=s["latencyS"] * 1000,
            baseline_what=f"same at {small:,} rows", target="<= 2",
            extra_ok=s["answer"] == b["answer"] == 3,
            extra_target=f"same answer at both sizes (3; got {s['answer']}, {b['answer']})",
            details={"calls": calls, "plans": {"small": s["plans"], "big": b["plans"]}}))
    return rows
