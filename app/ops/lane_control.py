"""Pause, resume and configure a lane. Both pause and resume are idempotent, and a pause
lasts until someone resumes it: nothing un-pauses a lane by itself."""

from __future__ import annotations

from typing import Any

from app import principal, validate, wire
from app.clock import iso
from app.errors import InvalidInput
from app.ops import lifecycle
from app.storage import leases, pickup, store
from app.storage.context import Context
from app.storage.db import transaction


def pause_lane(ctx: Context, *, assignee: str, reason: str | None = None,
               actor: str | None = None) -> dict[str, Any]:
    """Pause a lane and mark its active tasks; a second pause changes nothing."""
    s = ctx.settings
    a = validate.assignee(assignee, s)
    why = validate.reason(reason, s, required=False, field="reason") or "paused by operator"
    who = _actor(actor, s)
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the one clock: resumed_at starts the breaker's window
        store.ensure_lane(conn, assignee=a, now=now, max_in_flight=s.default_max_in_flight)
        lane = store.get_lane(conn, assignee=a, for_update=True)
        assert lane is not None
        already = bool(lane["paused"])
        if not already:
            store.set_lane_pause(conn, assignee=a, paused=True, reason=why, now=now)
            store.insert_event(conn, kind="lane_paused", at=now, assignee=a, actor=who,
                               reason=why)
            lane = store.get_lane(conn, assignee=a)
    assert lane is not None
    leases.set_paused(ctx, assignee=a, paused=True, reason=lane["paused_reason"],
                      paused_at=iso(lane["paused_at"]))
    return {"ok": True, "lane": wire.lane(lane), "alreadyPaused": already}


def resume_lane(ctx: Context, *, assignee: str, actor: str | None = None,
                reason: str | None = None) -> dict[str, Any]:
    """Resume a lane: clears the pause on it and its tasks, records ``resumed_at`` (which
    also restarts the breaker's counting window). Resuming a running lane changes nothing.
    The answer's ``wasPaused`` says which: true when this call lifted a pause."""
    s = ctx.settings
    a = validate.assignee(assignee, s)
    why = validate.reason(reason, s, required=False, field="reason")
    who = _actor(actor, s)
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the one clock: resumed_at starts the breaker's window
        lane = store.get_lane(conn, assignee=a, for_update=True)
        was_paused = bool(lane and lane["paused"])
        if lane is not None and was_paused:
            store.set_lane_pause(conn, assignee=a, paused=False, reason=None, now=now)
            store.insert_event(conn, kind="lane_resumed", at=now, assignee=a, actor=who,
                               reason=why, data={"wasPausedFor": lane["paused_reason"]})
            lane = store.get_lane(conn, assignee=a)
            store.notify_lane(conn, assignee=a)
            todo = store.count_todo(conn, assignee=a, limit=pickup.WAKE_CAP)
    leases.set_paused(ctx, assignee=a, paused=False, reason=None, paused_at=None)
    if was_paused:
        pickup.wake(ctx, assignee=a, n=todo)
    # ``wasPaused`` says what this resume did; ``alreadyRunning`` (its negation, read as
    # "not running" when it is false) stays for clients written against it (deprecated)
    return {"ok": True, "lane": wire.lane(lane) if lane is not None else None,
            "wasPaused": was_paused, "alreadyRunning": not was_paused}


def configure_lane(ctx: Context, *, assignee: str, max_in_flight: Any = None,
                   actor: str | None = None, max_attempts: Any = None,
                   backoff_base_s: Any = None, backoff_cap_s: Any = None) -> dict[str, Any]:
    """Set how many live leases a lane allows at once, and its task lifecycle settings
    (``max_attempts``, ``backoff_base_s``, ``backoff_cap_s``: SPEC 4.11); those given."""
    s = ctx.settings
    a = validate.assignee(assignee, s)
    mif = None if max_in_flight is None else validate.max_in_flight(max_in_flight)
    more = lifecycle.lifecycle_values(max_attempts=max_attempts, backoff_base_s=backoff_base_s,
                                      backoff_cap_s=backoff_cap_s)
    who = _actor(actor, s)
    if mif is None and not more:
        raise InvalidInput("give maxInFlight, maxAttempts, backoffBaseS or backoffCapS",
                           field="maxInFlight")
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the one clock: resumed_at starts the breaker's window
        store.ensure_lane(conn, assignee=a, now=now,
                          max_in_flight=mif if mif is not None else s.default_max_in_flight)
        store.get_lane(conn, assignee=a, for_update=True)
        if mif is not None:
            store.set_lane_max_in_flight(conn, assignee=a, max_in_flight=mif)
        store.set_lane_lifecycle(conn, assignee=a, values=more)
        data = {k: v for k, v in (("maxInFlight", mif), ("maxAttempts", more.get("max_attempts")),
                                  ("backoffBaseS", more.get("backoff_base_s")),
                                  ("backoffCapS", more.get("backoff_cap_s"))) if v is not None}
        store.insert_event(conn, kind="lane_configured", at=now, assignee=a,
                           actor=who, data=data)
        lane = store.get_lane(conn, assignee=a)
    assert lane is not None
    if mif is not None:
        leases.set_max_in_flight(ctx, assignee=a, max_in_flight=mif)
    return {"ok": True, "lane": wire.lane(lane)}


def _actor(actor: Any, s: Any) -> str | None:
    # under a credential, no actor given is no note: the credential is the actor
    return validate.actor(actor, s) or ("unknown" if principal.current() is None else None)
