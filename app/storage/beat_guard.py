"""One Celery beat at a time: the beat that holds the ``beat`` run-lock leads; another one
stands by until the lock is free, then takes over.

A second beat sending the same schedule would not break anything (every job runs under its
own run-lock, so the duplicates are skipped) but it would double the traffic and the
``skipped`` noise. The leader lock is an ordinary run-lock, so the status payload, the
panel and ``autonomy locks`` show which beat leads and whether it is alive. It has no time
budget -- it is held for the beat's life -- and its liveness is its heartbeat: a leader
killed with SIGKILL stops beating, and a standby (or self-heal) breaks its lock within
``lock_holder_dead_after_ms``. A leader that finds its lock taken away stops itself
(SIGTERM), so two beats never send at once for longer than one heartbeat.
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


def lead(ctx: Context, *, holder: str | None = None, stop: threading.Event | None = None,
         on_lost: Callable[[], None] | None = None) -> str | None:
    """Block until this process holds the beat lock, then keep it beating in a thread;
    answers the token (None if ``stop`` was set first). ``on_lost`` runs if the lock is
    ever taken away (default: SIGTERM to this process)."""
    who = holder or locks.default_holder("beat")
    stop = stop or threading.Event()
    poll_s = ctx.settings.beat_standby_poll_s
    announced = False
    while not stop.is_set():
        try:
            token = locks.acquire(ctx, JOB, budget_ms=BUDGET_MS, holder=who)
        except AutonomyError as e:
            log.warning("beat lock: %s; retrying in %gs", e.message, poll_s)
            stop.wait(poll_s)
            continue
        if token is not None:
            log.warning("beat lock taken by %s: this beat leads", who)
            threading.Thread(target=_keep, args=(ctx, token, stop, on_lost or _stop_self),
                             name="beat-lock", daemon=True).start()
            atexit.register(_release_quietly, ctx, token)
            return token
        current = next((lk for lk in locks.collect_run_locks(ctx) if lk["job"] == JOB), None)
        if current is not None and not current["holderAlive"]:
            broken = locks.break_dead_locks(ctx)
            log.warning("beat lock: the leader %s stopped beating; broke %d dead lock(s)",
                        current["holder"], len(broken))
            continue
        if not announced:
            log.warning("beat lock held by %s: this beat stands by",
                        current["holder"] if current else "another beat")
            announced = True
        stop.wait(poll_s)
    return None


def _keep(ctx: Context, token: str, stop: threading.Event,
          on_lost: Callable[[], None]) -> None:
    interval_s = ctx.settings.lock_heartbeat_interval_ms / 1000
    while not stop.wait(interval_s):
        try:
            if not locks.beat(ctx, JOB, token):
                log.error("beat lock lost (another beat leads now): stopping this beat")
                on_lost()
                return
        except AutonomyError as e:  # Redis blipped: the beat key outlives a few misses
            log.warning("beat lock heartbeat failed: %s", e.message)


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _release_quietly(ctx: Context, token: str) -> None:
    with contextlib.suppress(AutonomyError):  # else its heartbeat lapses; a standby breaks it
        locks.release(ctx, JOB, token)
