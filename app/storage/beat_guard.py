"""One Celery beat at a time: the beat that holds the beat leader lease (``app.storage.leader``)
leads; another one stands by (saying so in Redis on every poll) until the lease is free,
then takes over.

A second beat sending the same schedule would not break anything (every job runs under its
own run-lock, so the duplicates are skipped) but it would double the traffic and the
``skipped`` noise. The lease is not a run-lock: it has no budget, only a TTL that the
leader renews; the status payload's ``beat`` (and the panel, ``autonomy locks``) show who
leads, since when, when the lease was last renewed, and the standbys. A leader killed with
SIGKILL stops renewing, and a standby takes the lease once it lapses (within the TTL).

Faults (SPEC 4.7): a leader whose lease *vanished* (Redis restarted empty, or the lease
lapsed during an outage) takes it again with its own token and keeps leading -- that is
not a takeover. Only a lease held by another beat is; then the old leader stops itself
(SIGTERM; ``autonomy up`` starts it again, as a standby), so two beats never send at once
for longer than one renewal. A standby gives the incumbent the benefit of the doubt: once
it has seen a leader, it takes a free lease only when it finds it free twice,
``_confirm_s`` apart (a few renewals) -- so after a Redis restart the leader re-takes its
lease first and exactly one beat leads. A beat that never saw a leader takes a free lease
at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from app.storage import leader, locks
from app.storage.context import Context

log = logging.getLogger(__name__)

BACKOFF_MAX_POLLS = 8  # a beat that cannot reach Redis asks again at least this often

# monotonic time this process last confirmed its lease (taken or renewed); None: not leading
_confirmed_at: float | None = None


def _confirm_s(ctx: Context) -> float:
    """How long a standby waits to see a free lease again before taking it: a few of the
    leader's renewals."""
    return 2.5 * ctx.settings.beat_lease_renew_ms / 1000


def lead(ctx: Context, *, holder: str | None = None, stop: threading.Event | None = None,
         on_lost: Callable[[], None] | None = None) -> str | None:
    """Block until this process holds the beat leader lease, then keep renewing it in a
    thread; answers the token (None if ``stop`` was set first). ``on_lost`` runs if another
    beat ever takes the lease (default: SIGTERM to this process)."""
    who = holder or locks.default_holder("beat")
    stop = stop or threading.Event()
    poll_s = ctx.settings.beat_standby_poll_s
    announced = False
    seen_leader = False  # a standby that saw a leader confirms a free lease before taking it
    failures = 0
    while not stop.is_set():
        try:
            token, current = _try_lead(ctx, who, stop, confirm=seen_leader)
            if token is None:
                leader.stand_by(ctx, who)
        except Exception as e:  # the leader logic must not die (SPEC 4.7)
            # Redis down, refusing (OOM, READONLY, NOAUTH, DENIED, LOADING...) or anything
            # else: this beat cannot lead now; it says so and tries again, backing off
            failures += 1
            wait_s = _backoff_s(poll_s, failures)
            log.warning("beat lease: this beat cannot lead now (%s); retrying in %gs",
                        getattr(e, "message", None) or f"{type(e).__name__}: {e}", wait_s)
            stop.wait(wait_s)
            continue
        failures = 0
        if token is not None:
            _confirm()
            log.warning("beat lease taken by %s: this beat leads", who)
            threading.Thread(target=_keep, args=(ctx, token, who, stop,
                                                 on_lost or _stop_self),
                             name="beat-lock", daemon=True).start()
            atexit.register(_release_quietly, ctx, token)
            return token
        if current is not None:
            seen_leader = True
        if not announced and current is not None:
            log.warning("beat lease held by %s: this beat (%s) stands by", current, who)
            announced = True
        stop.wait(poll_s)
    return None


def _backoff_s(poll_s: float, failures: int) -> float:
    """The wait after ``failures`` failed rounds in a row: the poll period, doubling up
    to ``BACKOFF_MAX_POLLS`` of them."""
    return poll_s * min(2 ** max(0, failures - 1), BACKOFF_MAX_POLLS)


def _try_lead(ctx: Context, who: str, stop: threading.Event, *, confirm: bool
              ) -> tuple[str | None, str | None]:
    """One round: (token, None) when this beat now leads, else (None, the leader or None)."""
    holder = leader.view(ctx)["leader"]
    if holder is not None:
        return None, holder
    if confirm:  # free now: still, after the leader had a few renewals' time to re-take it?
        if stop.wait(_confirm_s(ctx)):
            return None, None
        holder = leader.view(ctx)["leader"]
        if holder is not None:
            return None, holder
    return leader.acquire(ctx, who)


def _keep(ctx: Context, token: str, who: str, stop: threading.Event,
          on_lost: Callable[[], None]) -> None:
    interval_s = ctx.settings.beat_lease_renew_ms / 1000
    failing = False
    while not stop.wait(interval_s):
        try:
            state = leader.renew(ctx, token)
            if state == leader.GONE:  # vanished, not taken: take it again, same token
                got, _ = leader.acquire(ctx, who, token=token)
                if got is not None:
                    log.warning("beat lease had vanished (Redis restarted or it lapsed): "
                                "re-took it; this beat still leads")
                    state = leader.RENEWED
        except Exception as e:  # Redis down or stalled: keep trying, said once
            if stop.is_set():  # shutting down: the context may be closed under us
                return
            if not failing:
                log.warning("beat lease renewal failed: %s; retrying",
                            getattr(e, "message", e))
                failing = True
            continue
        if failing:
            log.warning("beat lease renewal answers again")
            failing = False
        if state == leader.RENEWED:
            _confirm()
        else:
            _forget()
            holder = None
            with contextlib.suppress(Exception):  # only for the log line
                holder = leader.view(ctx)["leader"]
            log.error("beat lease taken by another beat (%s): stopping this beat",
                      holder or "unknown")
            on_lost()
            return


def _confirm() -> None:
    global _confirmed_at
    _confirmed_at = time.monotonic()


def _forget() -> None:
    global _confirmed_at
    _confirmed_at = None


def may_send(ctx: Context) -> bool:
    """True while this process leads on a lease it confirmed recently enough that no other
    beat can hold it yet: less than (TTL - one renewal) ago. A leader cut off from Redis
    stops sending before its lease can lapse, so it never sends the jobs that fall due
    while a standby may already lead (SPEC 4.7); it sends again once a renewal answers."""
    at = _confirmed_at
    if at is None:
        return False
    s = ctx.settings
    return time.monotonic() - at < (s.beat_lease_ttl_ms - s.beat_lease_renew_ms) / 1000


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _release_quietly(ctx: Context, token: str) -> None:
    with contextlib.suppress(Exception):  # else it lapses within its TTL
        leader.release(ctx, token)
