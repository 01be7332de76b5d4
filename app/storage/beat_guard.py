"""One Celery beat at a time: the beat that holds the beat leader lease (``app.storage.leader``)
leads; another one stands by (saying so in Redis on every poll) until the lease is free,
then takes over.

A second beat sending the same schedule would not break anything (every job runs under its
own run-lock, so the duplicates are skipped) but it would double the traffic and the
``skipped`` noise. The lease is not a run-lock: it has no budget, only a TTL that the
leader renews; the status payload's ``beat`` (and the panel, ``autonomy locks``) show who
leads, since when, when the lease was last renewed, and the standbys. A leader killed with
SIGKILL stops renewing, and a standby takes the lease once it lapses (within the TTL). A
leader that finds its lease taken away stops itself (SIGTERM), so two beats never send at
once for longer than one renewal.
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
from app.storage import leader, locks
from app.storage.context import Context

log = logging.getLogger(__name__)



def lead(ctx: Context, *, holder: str | None = None, stop: threading.Event | None = None,
         on_lost: Callable[[], None] | None = None) -> str | None:
    """Block until this process holds the beat leader lease, then keep renewing it in a
    thread; answers the token (None if ``stop`` was set first). ``on_lost`` runs if the
    lease is ever taken away (default: SIGTERM to this process)."""
    who = holder or locks.default_holder("beat")
    stop = stop or threading.Event()
    poll_s = ctx.settings.beat_standby_poll_s
    announced = False
    while not stop.is_set():
        try:
            token, current = leader.acquire(ctx, who)
            if token is None:
                leader.stand_by(ctx, who)
        except AutonomyError as e:
            log.warning("beat lease: %s; retrying in %gs", e.message, poll_s)
            stop.wait(poll_s)
            continue
        if token is not None:
            log.warning("beat lease taken by %s: this beat leads", who)
            threading.Thread(target=_keep, args=(ctx, token, stop, on_lost or _stop_self),
                             name="beat-lock", daemon=True).start()
            atexit.register(_release_quietly, ctx, token)
            return token
        if not announced:
            log.warning("beat lease held by %s: this beat stands by", current)
            announced = True
        stop.wait(poll_s)
    return None


def _keep(ctx: Context, token: str, stop: threading.Event,
          on_lost: Callable[[], None]) -> None:
    interval_s = ctx.settings.beat_lease_renew_ms / 1000
    while not stop.wait(interval_s):
        try:
            if leader.renew(ctx, token) != leader.RENEWED:
                log.error("beat lease lost (another beat leads now): stopping this beat")
                on_lost()
                return
        except AutonomyError as e:  # Redis blipped: the lease outlives a few misses
            log.warning("beat lease renewal failed: %s", e.message)


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _release_quietly(ctx: Context, token: str) -> None:
    with contextlib.suppress(AutonomyError):  # else it lapses within its TTL
        leader.release(ctx, token)
