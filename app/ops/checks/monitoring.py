"""What ``/metrics`` exports beyond the status payload: the Redis and beat-leader signals
when the payload does not carry them itself.

The status payload's top-level ``redis`` (``"ok"`` | ``"degraded"``) and ``beat``
(``{"leader", "since", "renewedAt", "ttlMs", "standbys"}``) win whenever present. Without
them, ``with_fallbacks`` works them out cheaply: Redis by one ``PING`` of the context's
client; the beat leader from the beat's run-lock entry the payload already lists
(``workflowHealth.runLocks``, job ``beat_guard.JOB``, alive while its holder beats). The
fallback knows no standbys, so it leaves them out rather than claim zero. The beat's lock
is a leader lease, not a periodic job's run-lock (its "budget" is ten years): the fallback
takes it out of the run-locks it hands on, so that ``/metrics`` shows it only as the leader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from app.storage import beat_guard
from app.storage.context import Context


def redis_state(ctx: Context) -> str:
    """``"ok"`` when the context's Redis answers a ``PING``, else ``"degraded"``."""
    try:
        ctx.redis.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return "degraded"
    return "ok"


def beat_from_run_locks(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The beat leader as the beat's run-lock shows it (``leader`` None when no live
    holder)."""
    wh = payload.get("workflowHealth")
    held = wh.get("runLocks") if isinstance(wh, Mapping) else None
    lock = next((lk for lk in held or [] if isinstance(lk, Mapping)
                 and lk.get("job") == beat_guard.JOB and lk.get("holderAlive")), None)
    if lock is None:
        return {"leader": None, "since": None}
    return {"leader": lock.get("holder"), "since": lock.get("startedAt")}


def with_fallbacks(ctx: Context, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with ``redis`` and ``beat`` filled in when it lacks them."""
    out = dict(payload)
    if out.get("redis") not in ("ok", "degraded"):
        out["redis"] = redis_state(ctx)
    if not isinstance(out.get("beat"), Mapping):
        out["beat"] = beat_from_run_locks(out)
        wh = out.get("workflowHealth")
        if isinstance(wh, Mapping) and isinstance(wh.get("runLocks"), list):
            kept = [lk for lk in wh["runLocks"]
                    if not (isinstance(lk, Mapping) and lk.get("job") == beat_guard.JOB)]
            out["workflowHealth"] = {**wh, "runLocks": kept, "runLocksCount": len(kept)}
    return out
