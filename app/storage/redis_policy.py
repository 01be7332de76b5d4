"""Is the Redis we use configured to keep the fleet's keys? (SPEC 4.7, "Redis that evicts
keys")

A Redis whose ``maxmemory-policy`` evicts keys drops the fleet's keys when it is full: a
run-lock in the middle of its run, the beat leader lease, a lease's dedupe key --
``allkeys-*`` any key, ``volatile-*`` keys with a TTL, which every key of the fleet has
(the fault suite's volatile-lru row, another app's keys filling Redis, saw run-locks
evicted and the beat lease taken over). The database keeps every decision right and the
fencing holds, but runs are cut short and beats lose their lease. ``noeviction`` (a full
Redis refuses writes: the fleet degrades to the database and says so) is the setting a
deployment needs (``docs/operations.md``).

``policy(ctx)`` reads ``INFO memory`` (``CONFIG GET`` is often disabled on managed Redis),
at most once per ``POLICY_TTL_S`` per context; status, ``/readyz`` and ``/metrics`` show
it and name an evicting one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from app.storage.context import Context
from app.storage.redis_errors import ANY_REDIS_ERROR

POLICY_TTL_S = 30.0
_guard = threading.Lock()


@dataclass(frozen=True)
class Policy:
    """Redis's ``maxmemory-policy`` and ``maxmemory`` (bytes, 0: no limit)."""

    name: str
    maxmemory: int

    @property
    def evicts_fleet_keys(self) -> bool:
        """``allkeys-*`` or ``volatile-*``: a full Redis drops run-locks and leases (they
        all carry a TTL)."""
        return self.name.startswith(("allkeys-", "volatile-"))

    def warning(self) -> str | None:
        """What is wrong with this policy, for status and ``/readyz``; None when fine."""
        if not self.evicts_fleet_keys:
            return None
        return (f"Redis maxmemory-policy is {self.name}: when full it evicts run-locks and "
                "leases; use noeviction (docs/operations.md)")


def policy(ctx: Context) -> Policy | None:
    """Redis's memory policy as last read (at most ``POLICY_TTL_S`` old); None while Redis
    cannot say (down, refusing, or ``INFO`` not allowed)."""
    now = time.monotonic()
    cached = ctx.__dict__.get("_redis_policy")
    if cached is not None and now - cached[0] < POLICY_TTL_S:
        return cached[1]
    with _guard:
        try:
            info = ctx.fast_redis.info("memory")
            got: Policy | None = Policy(name=str(info.get("maxmemory_policy", "")),
                                        maxmemory=int(info.get("maxmemory", 0) or 0))
        except ANY_REDIS_ERROR:
            got = None
        # a failed read is not cached: the next caller asks again
        if got is not None:
            ctx.__dict__["_redis_policy"] = (now, got)
    return got
