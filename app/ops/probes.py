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
from app.storage import db, leader
from app.storage.context import Context
from app.storage.redis_conn import redis_errors


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
    try:
        # the fast path's client: its short deadline and no retries, so a stalled Redis
        # answers the probe in well under a second, as it does for claims
        with redis_errors(ctx.fast_redis):
            ctx.fast_redis.ping()
        out["redis"] = "ok"
    except AutonomyError as e:
        out["redis"] = "degraded"
        problems.append(f"redis degraded: {e.message}")
        if ctx.settings.readyz_redis_required:
            failed.append("redis")
    out["failed"] = failed
    if problems:
        out["message"] = "; ".join(problems)
    if failed:
        out.update(ok=False, error="not_ready")
    return out


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
