"""Push pickup: a claim that found its lane empty waits for a signal instead of polling.

Whatever makes a task claimable -- create, a lease released or requeued, a failure that
returns its task to ``todo``, a resume -- pushes one wake per task onto the lane's wake
list (``lane:{assignee}:wake``); a waiting claim blocks on it (``BRPOP``), so one task
wakes one waiter, not the whole fleet. A wake pushed while nobody waits stays in the list
(capped, with a TTL) for the next waiter, so none is lost between a claim that found the
lane empty and its wait.

Nothing here is the authority: a wake is only a hint to claim now, and the database
decides. The waiting claims of one process share one blocked ``BRPOP`` over their lanes'
wake lists (``app.storage.pickup_hub``), so an idle process costs Redis about two commands
per ``pickup_block_s`` whatever its number of waiters (issue 22). Besides wakes, one
process per lane leads the lane's slow safety poll (``lane:{assignee}:poll``, its token,
renewed every ``pickup_block_s``): one of its waiters claims once per
``pickup_safety_poll_ms`` -- the database alone, no Redis command while the lane is empty
-- so an idle fleet costs the database one claim per period per lane whatever its size,
and still finds work that arrived without a wake (Redis flushed, a task written by hand).

A task that is not yet due (a delayed create, a failure's backoff) cannot be claimed when
its wake arrives: the waiter that claims and finds nothing reads when the lane's next task
falls due, bounds its wait by it and tells its process (``note_due``, kept past this
claim), and then one waiter per due instant claims (``take_due_turn``,
``lane:{assignee}:due:{ms}``, ``SET NX PX``); the safety poll still finds what a missed
turn leaves.

When Redis is degraded, PostgreSQL's LISTEN/NOTIFY carries the wakes instead: producers
``NOTIFY`` the lane in their own transaction (``store.notify_lane``) and a waiter listens
on a connection of its own; on SQLite without Redis the waiter sleeps out a slice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.storage import pickup_hub
from app.storage.context import Context
from app.storage.redis_errors import ANY_REDIS_ERROR, CANDIDATES, describe, is_unavailable
from app.storage.redis_scripts import Script, run_script

log = logging.getLogger(__name__)

# KEYS[1] the lane's wake list; ARGV[1] wakes to push, ARGV[2] cap, ARGV[3] TTL ms
_WAKE = Script("""
for i = 1, tonumber(ARGV[1]) do redis.call('LPUSH', KEYS[1], '1') end
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")
WAKE_CAP = 1024  # wakes kept for waiters to come: more than any lane's waiting fleet
CHANNEL = "autonomy_lane"  # PostgreSQL NOTIFY channel; the payload is the lane's name


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


def wait(ctx: Context, *, assignee: str, timeout_s: float) -> str:
    """Block until a wake for the lane arrives or ``timeout_s`` passes. Answers ``"wake"``,
    ``"poll"`` (no wake, but this waiter's turn for the lane's safety poll: the database
    alone answers its claim), ``"due"`` (a delayed task fell due) or ``"timeout"`` (claim
    nothing). Never longer than ``timeout_s``."""
    timeout_s = max(0.0, timeout_s)
    deadline = time.monotonic() + timeout_s
    # the degraded flag, not ``usable()``: a waiter takes no re-probe from the fast path
    # (whose answer clears the flag); the waiters' own claims re-probe
    if not ctx.redis_health.degraded:
        got = pickup_hub.hub(ctx).wait(assignee, timeout_s)
        if got != "degraded":
            return got
        timeout_s = max(0.0, deadline - time.monotonic())
    if ctx.engine.dialect.name == "postgresql":
        return _wait_notify(ctx, assignee=assignee, timeout_s=timeout_s)
    time.sleep(min(timeout_s, ctx.settings.pickup_safety_poll_ms / 1000))
    return "poll"


def _wait_notify(ctx: Context, *, assignee: str, timeout_s: float) -> str:
    """LISTEN on a connection of our own (kept per context) for the lane's NOTIFY."""
    conn = _listener(ctx)
    deadline = time.monotonic() + min(timeout_s, ctx.settings.pickup_safety_poll_ms / 1000)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "poll"
            for n in conn.notifies(timeout=left, stop_after=1):
                if n.payload == assignee:
                    return "wake"
    except Exception as e:  # the listener died (server restart): a fresh one next time
        ctx.__dict__.pop("_pickup_listener", None)
        log.debug("postgres: LISTEN for lane %s failed: %s", assignee, e)
        time.sleep(min(max(0.0, deadline - time.monotonic()), 1.0))
        return "poll"


def _listener(ctx: Context) -> Any:
    conn = ctx.__dict__.get("_pickup_listener")
    if conn is None or conn.closed:
        import psycopg

        url = ctx.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        conn = psycopg.connect(url, autocommit=True,
                               connect_timeout=max(1, int(ctx.settings.db_connect_timeout_s)))
        conn.execute(f"LISTEN {CHANNEL}")
        ctx.__dict__["_pickup_listener"] = conn
    return conn


def take_turn(ctx: Context, *, assignee: str) -> str | None:
    """Without blocking or a Redis command: may a claim that is about to wait try the
    database first? ``"wake"`` when a wake this process popped is pending (taken);
    ``"poll"`` when Redis cannot say (degraded: the database decides every time)."""
    if ctx.redis_health.degraded:
        return "poll"
    return "wake" if pickup_hub.hub(ctx).take_pending(assignee) else None


def waiting(ctx: Context, *, assignee: str) -> int:
    """Claims of this process (context) waiting on the lane's wake list now."""
    got = ctx.__dict__.get("_pickup_hub")
    return 0 if got is None else int(got.waiting(assignee))


def note_due(ctx: Context, *, assignee: str, in_s: float, due_ms: int) -> None:
    """The lane's next delayed task falls due in ``in_s`` (at ``due_ms``): this process
    hands one of its waiters a ``"due"`` turn then (if it wins that instant), whether or
    not the claim that read it still waits."""
    if not ctx.redis_health.degraded:
        pickup_hub.hub(ctx).note_due(assignee, in_s, due_ms)


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
