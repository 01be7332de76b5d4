"""The status payload (SPEC 4.6): built by one function that the status job, the CLI, the
HTTP API, the control panel and ``/metrics`` all call.

Every part carries its own ``error`` when its signal is missing or unreadable, so the
payload always answers; only an unreachable database raises (``Unavailable``). While
Redis is down or stalled the payload says ``redis: "degraded"`` and ``workflowHealth``
carries ``error: "redis_unavailable"`` (its run-locks and counters live in Redis).
``redisMemory`` is Redis's ``maxmemory-policy`` (``evictsFleetKeys`` and a ``warning``
for an ``allkeys-*`` one, which can drop run-locks and leases); null while unknown.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app import wire
from app.clock import iso
from app.errors import RedisUnavailable
from app.ops import breaker, retention
from app.ops.checks import handoff, readiness, runs, selfheal, state
from app.storage import leader, leases, locks, redis_policy, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.redis_errors import redis_errors


def _fingerprints(conn: Any, ctx: Context, *, since: datetime,
                  resumed: dict[str, datetime | None]) -> list[dict[str, Any]]:
    """Recent fingerprints with the count the breaker uses: since the lane's last resume
    when that is within the window (``countSince``), else over the window; ``windowCount``
    is every hit in the window. Most counted first."""
    s, now = ctx.settings, ctx.clock()
    out = []
    for r in store.recent_fingerprints(conn, since=since):
        start = breaker.window_start(now=now, window_h=s.breaker_window_h,
                                     resumed_at=resumed.get(r["assignee"]))
        window = int(r["count"])
        count = window if start <= since else store.count_fingerprint(
            conn, fingerprint=r["fingerprint"], since=start)
        out.append({"fingerprint": r["fingerprint"], "assignee": r["assignee"],
                    "count": count, "windowCount": window, "countSince": iso(start),
                    "sinceResume": start > since, "threshold": s.breaker_threshold,
                    "lastAt": iso(r["last_at"])})
    out.sort(key=lambda f: -f["count"])
    return out


def build_status(ctx: Context) -> dict[str, Any]:
    """The whole fleet at a glance: run-locks, lanes, handoff, ops incident, readiness,
    self-heal, each job's last run, recent failure fingerprints, counters."""
    s, now = ctx.settings, ctx.clock()
    with transaction(ctx.engine, write=False) as conn:
        counts = store.lane_status_counts(conn)
        lane_rows = store.list_lanes(conn)
        lanes = [wire.lane(row, counts.get(row["assignee"], {})) for row in lane_rows]
        states = runs.load_states(conn, now=now)
        ho = handoff.snapshot_view(conn, ctx, states)
        incident = state.incident(states, ctx=ctx)
        ready = readiness.readiness_view(states, ctx)
        heal = selfheal.selfheal_view(states)
        jobs = runs.job_views(states, ctx)
        since = now - timedelta(hours=s.breaker_window_h)
        pruning = retention.retention_view(ctx, conn, now)
        resumed = {r["assignee"]: r["resumed_at"] for r in lane_rows}
        fingerprints = _fingerprints(conn, ctx, since=since, resumed=resumed)
    run_locks: list[dict[str, Any]] = []
    beat = leader.unknown(ctx)
    metrics: dict[str, int] = {}
    redis_ok = leases.probe(ctx)
    if redis_ok:
        try:
            run_locks = locks.collect_run_locks(ctx)
            beat = leader.view(ctx)
            with redis_errors(ctx.redis):
                metrics = {str(k): int(v)
                           for k, v in ctx.redis.hgetall(ctx.keys.metrics()).items()}
        except RedisUnavailable as e:
            ctx.redis_health.failed(e)
            redis_ok = False
    memory = None
    if redis_ok:
        pol = redis_policy.policy(ctx)
        if pol is not None:
            memory = {"maxmemoryPolicy": pol.name, "maxmemoryBytes": pol.maxmemory,
                      "evictsFleetKeys": pol.evicts_fleet_keys, "warning": pol.warning()}
    health: dict[str, Any] = {"runLocks": run_locks, "runLocksCount": len(run_locks),
                              "jobs": jobs}
    if not redis_ok:  # the run-locks and counters live in Redis: unknown, not "none"
        health["error"] = RedisUnavailable.code
    return {
        "ok": True,
        "generatedAt": iso(now),
        "redis": "ok" if redis_ok else "degraded",
        "redisMemory": memory,
        "workflowHealth": health,
        "beat": beat,
        "lanes": lanes,
        "handoff": ho,
        "opsIncident": incident,
        "readiness": ready,
        "selfHeal": heal,
        "fingerprints": fingerprints,
        "metrics": metrics,
        "retention": pruning,
    }
