"""The status payload (SPEC 4.6): built by one function that the status job, the CLI, the
HTTP API, the control panel and ``/metrics`` all call.

Every part carries its own ``error`` when its signal is missing or unreadable, so the
payload always answers; only an unreachable database or Redis raises (``Unavailable``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app import leader, locks, store, wire
from app.checks import handoff, readiness, runs, selfheal, state
from app.clock import iso
from app.context import Context
from app.db import transaction
from app.redis_conn import redis_errors


def build_status(ctx: Context) -> dict[str, Any]:
    """The whole fleet at a glance: run-locks, the beat leader lease, lanes, handoff, ops
    incident, readiness, self-heal, each job's last run, recent failure fingerprints,
    counters."""
    s, now = ctx.settings, ctx.clock()
    with transaction(ctx.engine, write=False) as conn:
        counts = store.lane_status_counts(conn)
        lanes = [wire.lane(row, counts.get(row["assignee"], {}))
                 for row in store.list_lanes(conn)]
        states = runs.load_states(conn, now=now)
        ho = handoff.snapshot_view(conn, ctx, states)
        incident = state.incident(states, ctx=ctx)
        ready = readiness.readiness_view(states, ctx)
        heal = selfheal.selfheal_view(states)
        jobs = runs.job_views(states, ctx)
        since = now - timedelta(hours=s.breaker_window_h)
        fingerprints = [{"fingerprint": r["fingerprint"], "assignee": r["assignee"],
                         "count": int(r["count"]), "threshold": s.breaker_threshold,
                         "lastAt": iso(r["last_at"])}
                        for r in store.recent_fingerprints(conn, since=since)]
    held = locks_view(ctx)
    with redis_errors(ctx.redis):
        metrics = {k: int(v) for k, v in ctx.redis.hgetall(ctx.keys.metrics()).items()}
    return {
        "ok": True,
        "generatedAt": iso(now),
        "workflowHealth": {"runLocks": held["runLocks"],
                           "runLocksCount": held["runLocksCount"], "jobs": jobs},
        "beat": held["beat"],
        "lanes": lanes,
        "handoff": ho,
        "opsIncident": incident,
        "readiness": ready,
        "selfHeal": heal,
        "fingerprints": fingerprints,
        "metrics": metrics,
    }


def locks_view(ctx: Context) -> dict[str, Any]:
    """The held run-locks and the beat leader lease: what the status payload, ``celery
    inspect run_locks``, the worker's stats in Flower and ``autonomy locks`` all show."""
    held = locks.collect_run_locks(ctx)
    return {"runLocks": held, "runLocksCount": len(held), "beat": leader.view(ctx)}
