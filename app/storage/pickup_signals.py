"""Push pickup's signals, shared by ``pickup`` (the waiters) and ``pickup_hub`` (the
process's one blocked wait): the wake a claimable task pushes to its lane, the turn one
waiter takes when a delayed task falls due, and what a failed Redis call of either means.
(Apart so that neither module imports the other.)"""

from __future__ import annotations

import logging

from app.storage.context import Context
from app.storage.redis_errors import ANY_REDIS_ERROR, CANDIDATES, describe, is_unavailable
from app.storage.redis_scripts import Script, run_script

log = logging.getLogger("app.storage.pickup")

# KEYS[1] the lane's wake list; ARGV[1] wakes to push, ARGV[2] cap, ARGV[3] TTL ms
_WAKE = Script("""
for i = 1, tonumber(ARGV[1]) do redis.call('LPUSH', KEYS[1], '1') end
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")
WAKE_CAP = 1024  # wakes kept for waiters to come: more than any lane's waiting fleet

def wake(ctx: Context, *, assignee: str, n: int = 1) -> None:
    """Tell waiters of the lane that ``n`` tasks became claimable (best effort: a missed
    wake costs at most one safety poll of latency)."""
    if n <= 0 or not ctx.redis_health.usable():
        return
    ttl_ms = max(ctx.settings.pickup_safety_poll_ms * 2, 10_000)
    try:
        run_script(ctx, _WAKE, 1, ctx.keys.lane_wake(assignee), min(n, WAKE_CAP), WAKE_CAP,
                   ttl_ms, fast=True)
    except ANY_REDIS_ERROR as e:
        # after the commit that made the task claimable: never an error (SPEC 4.7)
        if is_unavailable(e):
            ctx.redis_health.failed(e)
        log.debug("redis: could not push a wake for lane %s: %s", assignee, describe(e))


def note_failure(ctx: Context, e: BaseException, what: str) -> None:
    """A Redis call of push pickup failed: degraded when it means Redis is unavailable."""
    if is_unavailable(e):
        ctx.redis_health.failed(e)  # type: ignore[arg-type]
    log.debug("redis: could not %s: %s", what, describe(e))


def take_due_turn(ctx: Context, *, assignee: str, due_ms: int) -> bool:
    """Without blocking: may this waiter claim now that the lane's delayed task due at
    ``due_ms`` fell due? Yes for one waiter per due instant, or for every one while Redis
    cannot say (the database decides)."""
    if not ctx.redis_health.usable():
        return True
    try:
        return bool(ctx.fast_redis.set(ctx.keys.lane_due(assignee, due_ms), "1", nx=True,
                                       px=max(ctx.settings.pickup_safety_poll_ms, 10_000)))
    except CANDIDATES as e:
        if not is_unavailable(e):
            raise
        ctx.redis_health.failed(e)
        return True
