"""The status payload (SPEC 4.6): built by one function that the status job, the CLI, the
HTTP API, the control panel and ``/metrics`` all call.

Every part carries its own ``error`` when its signal is missing or unreadable, so the
payload always answers; only an unreachable database raises (``Unavailable``). While
Redis is down or stalled the payload says ``redis: "degraded"`` and ``workflowHealth``
carries ``error: "redis_unavailable"`` (its run-locks and counters live in Redis).
``redisMemory`` is Redis's ``maxmemory-policy`` (``evictsFleetKeys`` and a ``warning``
for an ``allkeys-*`` one, which can drop run-locks and leases); null while unknown.
``clockSkew`` (SPEC 4.9): the clock skew each worker reported in the last hour, the
furthest off first (at most ``CLOCK_SKEW_SHOWN``), with how many are off by more than
``clock_skew_warn_s``; ``error`` while Redis, which keeps the reports, cannot answer.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app import wire
from app.clock import from_ms, iso, to_ms
from app.errors import RedisUnavailable
from app.ops import breaker, retention
from app.ops.checks import handoff, readiness, runs, selfheal, state
from app.storage import leader, leases, locks, redis_policy, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.redis_errors import redis_errors


def _fingerprints(conn: Any, ctx: Context, *, now: datetime, since: datetime,
                  resumed: dict[str, datetime | None]) -> list[dict[str, Any]]:
    """Recent fingerprints with the count the breaker uses: since the lane's last resume
    when that is within the window (``countSince``), else over the window; ``windowCount``
    is every hit in the window, both from the database's ``now`` (the one clock). Most
    counted first."""
    s = ctx.settings
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
    s = ctx.settings
    with transaction(ctx.engine, write=False) as conn:
        now = ctx.now_in(conn)  # stale flags compare stored times: the one clock
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
        fingerprints = _fingerprints(conn, ctx, now=now, since=since, resumed=resumed)
    run_locks: list[dict[str, Any]] = []
    beat = leader.unknown(ctx)
    metrics: dict[str, int] = {}
    skews: dict[str, dict[str, int]] | None = None
    redis_ok = leases.probe(ctx)
    if redis_ok:
        try:
            run_locks = locks.collect_run_locks(ctx)
            beat = leader.view(ctx)
            with redis_errors(ctx.redis):
                metrics = {str(k): int(v)
                           for k, v in ctx.redis.hgetall(ctx.keys.metrics()).items()}
                skews = leases.clock_skews(ctx)
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
        "clockSkew": clock_skew_view(skews, now_ms=to_ms(now), warn_s=s.clock_skew_warn_s),
    }


CLOCK_SKEW_FRESH_S = 3600  # a report older than this is of a worker gone or idle: left out
CLOCK_SKEW_SHOWN = 50  # the furthest off first; the counts cover them all


def clock_skew_view(skews: dict[str, dict[str, int]] | None, *, now_ms: int,
                    warn_s: float) -> dict[str, Any]:
    """The workers' reported clock skews (``None``: Redis could not say) as status shows
    them: ``workers`` (worker, skewMs, reportedAt, skewed), ``reporting``, ``skewed``
    (how many are off by more than ``warn_s``), ``maxAbsMs`` and ``warnS``."""
    if skews is None:
        return {"warnS": warn_s, "workers": [], "error": RedisUnavailable.code}
    fresh = [(w, r) for w, r in skews.items()
             if now_ms - r["atMs"] <= CLOCK_SKEW_FRESH_S * 1000]
    fresh.sort(key=lambda wr: (-abs(wr[1]["skewMs"]), wr[0]))
    limit_ms = warn_s * 1000
    return {
        "warnS": warn_s,
        "reporting": len(fresh),
        "skewed": sum(1 for _, r in fresh if abs(r["skewMs"]) > limit_ms),
        "maxAbsMs": max((abs(r["skewMs"]) for _, r in fresh), default=None),
        "workers": [{"worker": w, "skewMs": r["skewMs"], "reportedAt": iso(from_ms(r["atMs"])),
                     "skewed": abs(r["skewMs"]) > limit_ms}
                    for w, r in fresh[:CLOCK_SKEW_SHOWN]],
    }
