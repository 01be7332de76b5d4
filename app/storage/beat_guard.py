"""One Celery beat at a time: the beat that holds the ``beat`` run-lock leads; another one
stands by until the lock is free, then takes over.

A second beat sending the same schedule would not break anything (every job runs under its
own run-lock, so the duplicates are skipped) but it would double the traffic and the
``skipped`` noise. The leader lock is an ordinary run-lock, so the status payload, the
panel and ``autonomy locks`` show which beat leads and whether it is alive. It has no time
budget -- it is held for the beat's life -- and its liveness is its heartbeat: a leader
killed with SIGKILL stops beating, and a standby (or self-heal) breaks its lock within
``lock_holder_dead_after_ms``.

Faults (SPEC 4.7): a leader whose lock key *vanished* (Redis restarted empty, or the key
lapsed during an outage) takes it again with the same token and keeps leading -- that is
not a takeover. Only a key held by another beat is; then the old leader stops itself
(SIGTERM; ``autonomy up`` starts it again, as a standby). A standby gives the incumbent
the benefit of the doubt: it takes a free lock, or breaks one whose holder stopped
beating, only when it finds it so twice, ``_confirm_s`` apart (a few of the leader's
heartbeats) -- so after a Redis restart the leader re-takes its key first and
exactly one beat leads. A beat that never saw a leader takes a free lock at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

from app.errors import AutonomyError
from app.storage import locks
from app.storage.context import Context

log = logging.getLogger(__name__)

JOB = "beat"
# held for the beat's life: never "over budget"; a dead leader is found by its heartbeat
BUDGET_MS = 10 * 365 * 24 * 3600 * 1000


def _confirm_s(ctx: Context) -> float:
    """How long a standby waits to see a free or dead lock again before acting on it: a
    few of the leader's heartbeats, half the time that declares a holder dead."""
    s = ctx.settings
    return max(2 * s.lock_heartbeat_interval_ms, s.lock_holder_dead_after_ms // 2) / 1000


def lead(ctx: Context, *, holder: str | None = None, stop: threading.Event | None = None,
         on_lost: Callable[[], None] | None = None) -> str | None:
    """Block until this process holds the beat lock, then keep it beating in a thread;
    answers the token (None if ``stop`` was set first). ``on_lost`` runs if another beat
    ever takes the lock (default: SIGTERM to this process)."""
    who = holder or locks.default_holder("beat")
    stop = stop or threading.Event()
    poll_s = ctx.settings.beat_standby_poll_s
    announced = False
    seen_leader = False  # a standby that saw a leader confirms a free lock before taking it
    while not stop.is_set():
        try:
            token = _try_lead(ctx, who, stop, confirm=seen_leader)
        except AutonomyError as e:
            log.warning("beat lock: %s; retrying in %gs", e.message, poll_s)
            stop.wait(poll_s)
            continue
        if token is not None:
            log.warning("beat lock taken by %s: this beat leads", who)
            threading.Thread(target=_keep, args=(ctx, token, who, stop,
                                                 on_lost or _stop_self),
                             name="beat-lock", daemon=True).start()
            atexit.register(_release_quietly, ctx, token)
            return token
        seen_leader = True
        if not announced:
            current = None
            with contextlib.suppress(AutonomyError):
                current = locks.holder_of(ctx, JOB)
            log.warning("beat lock held by %s: this beat (%s) stands by",
                        current["holder"] if current else "another beat", who)
            announced = True
        stop.wait(poll_s)
    return None


def _try_lead(ctx: Context, who: str, stop: threading.Event, *, confirm: bool) -> str | None:
    """One standby round: the token if this beat now leads, else None."""
    current = _current(ctx)
    if current is not None and current["holderAlive"]:
        return None
    if confirm:  # free or dead now: is it still, after the leader had a heartbeat's time?
        if stop.wait(_confirm_s(ctx)):
            return None
        again = _current(ctx)
        if again is not None and (again["holderAlive"] or current is None
                                  or again["startedAt"] != current["startedAt"]):
            return None
        current = again
    if current is not None:  # its holder stopped beating
        broken = locks.break_dead_locks(ctx)
        log.warning("beat lock: the leader %s stopped beating; broke %d dead lock(s)",
                    current["holder"], len(broken))
    return locks.acquire(ctx, JOB, budget_ms=BUDGET_MS, holder=who)


def _current(ctx: Context) -> dict[str, object] | None:
    return next((lk for lk in locks.collect_run_locks(ctx) if lk["job"] == JOB), None)


def _keep(ctx: Context, token: str, who: str, stop: threading.Event,
          on_lost: Callable[[], None]) -> None:
    interval_s = ctx.settings.lock_heartbeat_interval_ms / 1000
    failing = False
    while not stop.wait(interval_s):
        try:
            state = locks.keep(ctx, JOB, token, budget_ms=BUDGET_MS, holder=who)
        except Exception as e:  # Redis down or stalled: keep trying, said once
            if stop.is_set():  # shutting down: the context may be closed under us
                return
            if not failing:
                log.warning("beat lock heartbeat failed: %s; retrying",
                            getattr(e, "message", e))
                failing = True
            continue
        if failing:
            log.warning("beat lock heartbeat answers again")
            failing = False
        if state == "retaken":
            log.warning("beat lock key had vanished (Redis restarted or the key lapsed): "
                        "re-took it; this beat still leads")
        elif state == "lost":
            holder = None
            with contextlib.suppress(AutonomyError):
                holder = locks.holder_of(ctx, JOB)
            log.error("beat lock taken by another beat (%s): stopping this beat",
                      holder["holder"] if holder else "unknown")
            on_lost()
            return


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _release_quietly(ctx: Context, token: str) -> None:
    with contextlib.suppress(AutonomyError):  # else its heartbeat lapses; a standby breaks it
        locks.release(ctx, JOB, token)
