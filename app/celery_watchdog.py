"""The Celery worker's consumer watchdog: a worker that is alive but takes nothing exits,
so that its supervisor (compose's ``restart: unless-stopped``, Kubernetes, systemd)
starts a fresh one.

After a Redis restart a prefork worker's consumer can stop taking messages for good while
the process stays up (celery#10205, kombu#2007: "Pool callback raised exception" in its
log): the periodic checks silently stop running, and ``inspect ping`` still answers. The
watchdog is a thread in the worker's main process. Every ``celery_watchdog_s / 4`` it asks
the broker, on a connection of its own, how many messages wait in the worker's queue; when
messages have waited for ``celery_watchdog_s`` while the worker took none (no task
received, none discarded as expired or revoked) and its pool had a free slot, it logs why
and stops the worker with exit code 70 (``EX_SOFTWARE``), which a supervisor restarts. A
worker whose pool is full is busy, not stuck; a broker that cannot be asked proves nothing
and starts the count again. A consumer cancelled by hand (``celery control
cancel_consumer``) is a worker that takes nothing too, and is restarted the same way.
``celery_watchdog_s`` 0 turns the watchdog off.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("app.celery_watchdog")

EXIT_STUCK = 70  # EX_SOFTWARE: a supervisor restarts the worker
SHUTDOWN_GRACE_S = 60.0  # a warm shutdown that hangs longer ends the process outright


@dataclass
class Watch:
    """The watchdog's reasoning, apart from Celery and the clock (``check`` is called
    every few seconds)."""

    stuck_after_s: float
    clock: Callable[[], float] = time.monotonic
    taken_at: float = field(default=0.0)  # when the worker last took a message
    waiting_since: float | None = None  # since when messages wait with none taken
    last_check: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.taken_at = self.last_check = self.clock()

    def taken(self) -> None:
        """The worker took a message (received it, or discarded it as expired/revoked)."""
        self.taken_at = self.clock()

    def check(self, *, waiting: int | None, pool_full: bool) -> str | None:
        """Why the worker is stuck, or None. ``waiting``: messages in its queue, None when
        the broker could not say."""
        now = self.clock()
        took = self.taken_at >= self.last_check
        self.last_check = now
        if took or not waiting or pool_full:
            self.waiting_since = None
            return None
        if self.waiting_since is None:
            self.waiting_since = now
            return None
        waited = now - self.waiting_since
        if waited < self.stuck_after_s:
            return None
        return (f"{waiting} message(s) have waited in the queue for {waited:.0f} s and the "
                f"worker took none while its pool had a free slot: its consumer is stuck")


class ConsumerWatchdog:
    """The thread that runs ``Watch`` in a Celery worker and stops the worker when stuck."""

    def __init__(self, *, watch: Watch, queue: str, waiting: Callable[[], int | None],
                 pool_full: Callable[[], bool], stop_worker: Callable[[int], None],
                 interval_s: float) -> None:
        self.watch, self.queue = watch, queue
        self.waiting, self.pool_full, self.stop_worker = waiting, pool_full, stop_worker
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer-watchdog",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            why = self.watch.check(waiting=self.waiting(), pool_full=self.pool_full())
            if why is not None:
                log.error("consumer watchdog: queue %r: %s; stopping the worker (exit %d) "
                          "so that its supervisor starts a fresh one", self.queue, why,
                          EXIT_STUCK)
                self.stop_worker(EXIT_STUCK)
                return


def stop_celery_worker(code: int) -> None:
    """Ask the worker's main loop for a warm shutdown with ``code``; end the process
    outright if that has not happened within ``SHUTDOWN_GRACE_S``."""
    from celery.worker import state

    state.should_stop = code

    def last_resort() -> None:
        log.error("consumer watchdog: the warm shutdown hung for %.0f s; exiting %d",
                  SHUTDOWN_GRACE_S, code)
        os._exit(code)

    t = threading.Timer(SHUTDOWN_GRACE_S, last_resort)
    t.daemon = True
    t.start()
