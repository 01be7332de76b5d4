"""The Celery application: broker, result backend and beat schedule from settings.

``celery -A app.celery_app worker|beat|flower`` all load this module. Importing it reads
the settings and connects to nothing; a worker process builds its ``Context`` on first
use (``worker_context``) and rebuilds it after a fork.

- Broker and result backend are ``Settings.effective_redis_url``. Their keys carry the
  prefix ``{redis_prefix}celery:`` (kombu's and Celery's ``global_keyprefix``), so two
  deployments -- or a test and a developer -- sharing one Redis never see each other's
  queues, results, events or remote-control replies.
- Tasks go to ``Settings.celery_queue``; workers send task events (Flower sees every task
  and its result) and results are stored an hour with their task name and arguments.
- The beat schedule is ``beat_schedule.JOBS``; ``AUTONOMY_BEAT_EVERY_S`` overrides every
  period. A beat message expires after one period: when workers are down the queue does
  not fill with stale runs of the same job.
- ``celery -A app.celery_app inspect run_locks`` asks each worker for the held run-locks
  (the same list as the status payload's ``workflowHealth.runLocks``).
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import beat_init, worker_process_shutdown
from celery.worker.control import inspect_command

import beat_schedule
from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from app.storage.context import Context

RESULT_EXPIRES_S = 3600


def celery_key_prefix(settings: Settings) -> str:
    """The prefix of every broker and result key: the app's prefix plus ``celery:``."""
    return f"{settings.redis_prefix}celery:"


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` from ``beat_schedule.JOBS`` (period override applied)."""
    schedule: dict[str, dict[str, Any]] = {}
    for job, spec in beat_schedule.JOBS.items():
        every_s = settings.beat_every_s or float(spec["every_s"])
        schedule[job] = {
            "task": str(spec["task"]),
            "schedule": timedelta(seconds=every_s),
            "options": {"queue": settings.celery_queue, "expires": every_s},
        }
    return schedule


def configure(celery: Celery, settings: Settings) -> None:
    """Apply ``settings`` to a Celery app (broker, backend, queue, events, schedule)."""
    prefix = {"global_keyprefix": celery_key_prefix(settings)}
    celery.conf.update(
        broker_url=settings.effective_redis_url,
        result_backend=settings.effective_redis_url,
        broker_transport_options=dict(prefix),
        result_backend_transport_options=dict(prefix),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.celery_queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=RESULT_EXPIRES_S,
        result_extended=True,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=build_beat_schedule(settings),
    )


app = Celery("autonomy", include=["tasks.checks"])
configure(app, get_settings())


# --- the process's Context ------------------------------------------------------------

_ctx: tuple[int, Context] | None = None
_ctx_guard = threading.Lock()


def worker_context() -> Context:
    """This process's Context, built on first use; a forked child builds its own."""
    global _ctx
    from app.storage.context import Context

    with _ctx_guard:
        if _ctx is not None and _ctx[0] != os.getpid():
            # inherited across fork: drop the parent's pooled DB connections without
            # closing them (they are still the parent's); redis-py resets its own pool
            _ctx[1].engine.dispose(close=False)
            _ctx = None
        if _ctx is None:
            _ctx = (os.getpid(), Context.from_settings())
        return _ctx[1]


@worker_process_shutdown.connect
def _close_context(**_: Any) -> None:
    global _ctx
    with _ctx_guard:
        if _ctx is not None and _ctx[0] == os.getpid():
            _ctx[1].close()
        _ctx = None


# --- one beat at a time -----------------------------------------------------------------


@beat_init.connect
def _lead_beat(**_: Any) -> None:
    """Before beat sends anything: lead, or stand by until the leader's lock is free."""
    from app.ops.run_locks import lead_beat

    lead_beat(worker_context())


# --- remote control -------------------------------------------------------------------


@inspect_command()
def run_locks(state: Any, **_: Any) -> dict[str, Any]:
    """List held run-locks (job, holder, elapsed, budget, over budget, holder alive)."""
    from app.errors import AutonomyError
    from app.ops.run_locks import held

    try:
        locks = held(worker_context())
    except AutonomyError as e:
        return e.to_wire()
    return {"runLocks": locks, "runLocksCount": len(locks)}
