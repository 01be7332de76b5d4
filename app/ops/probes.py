"""Health probes: what ``GET /readyz`` and ``autonomy probe`` answer.

- ``ready(ctx)``: the database answers and its schema is at the code's head, and Redis
  answers PING. Each part says ``ok`` or what is wrong (``unreachable``, ``not_migrated``;
  Redis ``degraded``), and ``failed`` names the parts that are not ok.
- ``beat(ctx, holder_prefix)``: a beat whose holder starts with the prefix (by default this
  host's) led or stood by within the leader lease TTL -- a standby beat passes, a beat that
  stopped talking to Redis does not.

``/livez`` needs none of this: it answers from memory (no I/O).
"""

from __future__ import annotations

import socket
from typing import Any

from app.errors import AutonomyError
from app.storage import db, leader, leases, redis_policy
from app.storage.context import Context
from app.storage.redis_errors import ANY_REDIS_ERROR, describe, is_unavailable, unavailable


def ready(ctx: Context) -> dict[str, Any]:
    """``{"ok", "database", "redis", "failed", "message"?, ...}``: ``ok`` only when every
    part is (Redis down counts when ``readyz_redis_required``)."""
    out: dict[str, Any] = {"ok": True}
    problems: list[str] = []
    failed: list[str] = []
    try:
        current, head = db.schema_state(ctx.engine)
        if current != head:
            out["database"] = "not_migrated"
            out["schema"] = {"current": current, "head": head}
            problems.append(f"database not migrated (at {current}, code at {head}): run "
                            "`autonomy db upgrade`")
            failed.append("database")
        else:
            out["database"] = "ok"
    except AutonomyError as e:
        out["database"] = "unreachable"
        problems.append(f"database unreachable: {e.message}")
        failed.append("database")
    err = ping(ctx)
    if err is None:
        out["redis"] = "ok"
        pol = redis_policy.policy(ctx)
        if pol is not None and pol.warning():  # detail, not a failure (SPEC 4.7)
            out["redisMaxmemoryPolicy"] = pol.name
            out["warnings"] = [pol.warning()]
    else:
        out["redis"] = "degraded"
        problems.append(f"redis degraded: {err}")
        if ctx.settings.readyz_redis_required:
            failed.append("redis")
    out["failed"] = failed
    if problems:
        out["message"] = "; ".join(problems)
    if failed:
        out.update(ok=False, error="not_ready")
    return out


def ping(ctx: Context) -> str | None:
    """Ask Redis for one small write on the fast path's client (its short deadline and no
    retries, so a stalled Redis answers the probe in well under a second, as it does for
    claims; a write, because a full or read-only Redis answers PING): None when it
    answers, else why not. Any Redis error counts (an error reply -- OOM, READONLY,
    NOAUTH, DENIED, LOADING ... -- as much as no answer): the probe answers 503 naming
    Redis, never 500. One missed deadline is asked again while Redis is not yet degraded
    (``redis_degraded_after_misses``): a busy Redis is not a down one."""
    why = "no answer"
    for _ in range(ctx.settings.redis_degraded_after_misses):
        try:
            leases.write_probe(ctx)
        except ANY_REDIS_ERROR as e:
            if is_unavailable(e):
                ctx.redis_health.failed(e)
                why = (e if isinstance(e, AutonomyError)
                       else unavailable(e, ctx.fast_redis)).message
            else:
                return f"Redis answers the probe with an error: {describe(e)}"
            if ctx.redis_health.degraded:
                return why
            continue
        ctx.redis_health.ok()
        return None
    return why


def this_host() -> str:
    """The holder prefix of the beats on this host (holders are ``host:pid:beat``)."""
    return f"{socket.gethostname()}:"


def beat(ctx: Context, holder_prefix: str | None = None) -> dict[str, Any]:
    """Is a beat of this host (or of ``holder_prefix``) leading or standing by?"""
    prefix = holder_prefix if holder_prefix is not None else this_host()
    role = leader.heartbeat_of(ctx, prefix)
    answer: dict[str, Any] = {"ok": role is not None, "role": role, "holderPrefix": prefix,
                              "ttlMs": ctx.settings.beat_lease_ttl_ms}
    if role is None:
        answer.update(error="beat_silent",
                      message=f"no beat {prefix}* led or stood by within the lease TTL "
                              f"({ctx.settings.beat_lease_ttl_ms} ms)")
    return answer
