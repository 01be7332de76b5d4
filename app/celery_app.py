"""The Celery application: broker, result backend and beat schedule from settings.

``celery -A app.celery_app worker|beat|flower`` all load this module. Importing it reads
the settings and connects to nothing; a worker process builds its ``Context`` on first
use (``worker_context``) and rebuilds it after a fork.

- Broker and result backend are ``Settings.effective_redis_url``; a ``redis+sentinel://``
  one becomes Celery's ``sentinel://h1;sentinel://h2`` with ``master_name`` (and the
  sentinels' password) in both transport options (``app.redis_url``). Their keys carry the
  prefix ``{redis_prefix}celery:`` (kombu's and Celery's ``global_keyprefix``), so two
  deployments -- or a test and a developer -- sharing one Redis never see each other's
  queues, results, events or remote-control replies.
- Tasks go to ``Settings.celery_queue``; workers send task events (Flower sees every task
  and its result) and results are stored an hour with their task name and arguments.
- The beat schedule is ``beat_schedule.JOBS``; ``AUTONOMY_BEAT_EVERY_S`` overrides every
  period. A beat message expires after one period: when workers are down the queue does
  not fill with stale runs of the same job.
- ``celery -A app.celery_app inspect run_locks`` asks each worker for the held run-locks
  (the same list as the status payload's ``workflowHealth.runLocks``) and the beat leader
  lease. The same answer is in every worker's stats (a bootstep's ``info()``), which
  Flower's worker page shows under "Other": ``runLocks``, ``beat``, and one readable line
  per held lock (``run-lock <job>``: holder, elapsed vs budget, over budget, alive).
- Logging is ``app.logs`` (Celery's ``setup_logging`` signal: Celery leaves the root logger
  alone): worker and beat lines have the API's format, ``AUTONOMY_LOG_FORMAT=json`` for
  JSON lines; each line logged while a task runs carries its ``task_id``, ``worker`` (the
  Celery node name), ``task_name`` and ``lane`` (null: check jobs belong to no lane).
- A worker whose consumer takes nothing while messages wait (the kombu bug after a Redis
  restart) stops with exit code 70 for its supervisor to restart (``app.celery_watchdog``,
  ``celery_watchdog_s``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps
from celery.beat import PersistentScheduler
from celery.signals import (
    beat_init,
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    task_received,
    task_revoked,
    worker_process_shutdown,
)
from celery.worker.control import inspect_command
from pydantic import ValidationError

import beat_schedule
from app import celery_broker
from app.celery_watchdog import ConsumerWatchdog, Watch, stop_celery_worker
from app.errors import InvalidSettings
from app.redis_url import is_sentinel, parse_sentinel
from app.settings import Settings, describe_invalid, get_settings

if TYPE_CHECKING:
    from app.storage.context import Context

RESULT_EXPIRES_S = 3600
_beat_log = logging.getLogger("app.beat")


def celery_key_prefix(settings: Settings) -> str:
    """The prefix of every broker and result key: the app's prefix plus ``celery:``."""
    return f"{settings.redis_prefix}celery:"


def build_beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` from ``beat_schedule.JOBS`` (period override applied)."""
    from app.ops.checks import send_window

    schedule: dict[str, dict[str, Any]] = {}
    for job, spec in beat_schedule.JOBS.items():
        every_s = settings.beat_every_s or float(spec["every_s"])
        schedule[job] = {
            "task": str(spec["task"]),
            "schedule": timedelta(seconds=every_s),
            # no Celery ``expires``: it compares the beat host's clock with the worker's.
            # A message is good for one period on Redis's clock instead (send_window)
            "options": {"queue": settings.celery_queue,
                        "headers": send_window.period_header(every_s)},
        }
    return schedule


def configure(celery: Celery, settings: Settings) -> None:
    """Apply ``settings`` to a Celery app (broker, backend, queue, events, schedule)."""
    # kombu's Redis transport with a crash on a lost broker fixed (app.celery_broker)
    celery_broker.install()
    prefix: dict[str, object] = {"global_keyprefix": celery_key_prefix(settings)}
    url = settings.effective_redis_url
    if is_sentinel(url):  # kombu's and Celery's own Sentinel form (app.redis_url)
        target = parse_sentinel(url)
        url = target.celery_url()
        prefix.update(target.celery_options())
    celery.conf.update(
        broker_url=url,
        result_backend=url,
        # a socket deadline and a health check on the broker connection: after a Redis
        # restart the worker's consumer notices and reconnects instead of waiting on a
        # dead socket (issue 9: it stopped consuming for good)
        broker_transport_options={**prefix,
                                  "socket_timeout": max(settings.redis_socket_timeout_s, 5.0),
                                  "socket_connect_timeout": settings.redis_socket_timeout_s,
                                  "health_check_interval": 10},
        result_backend_transport_options=dict(prefix),
        # the result backend's own deadlines (Celery's default is none): a pool process
        # storing a result (or STARTED) on a Redis whose host was cut off waited forever,
        # and the worker ran nothing more, failover or not (issue 22)
        redis_socket_timeout=settings.redis_socket_timeout_s,
        redis_socket_connect_timeout=settings.redis_socket_timeout_s,
        redis_backend_health_check_interval=10,
        broker_connection_retry_on_startup=True,
        # no task here acks late, so this cancels nothing; said explicitly, a lost broker
        # connection costs one warning line instead of Celery's 10-line deprecation notice
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # a Redis that answers with an error (OOM when full, READONLY after a failover,
        # NOAUTH, DENIED, MISCONF...) is a channel error to kombu, which Celery does not
        # retry by default: the worker logged "Unrecoverable error: OutOfMemoryError" and
        # exited. Retried like a lost connection, the worker waits for Redis (SPEC 4.7)
        broker_channel_error_retry=True,
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
        beat_scheduler="app.celery_app:LeaderScheduler",
    )


def _settings_or_exit() -> Settings:
    # a malformed setting (a REDIS_URL Celery cannot use...) stops worker, beat and Flower
    # with one line and the CLI's exit code, not an import traceback
    try:
        return get_settings()
    except ValidationError as e:
        print(f"error: {InvalidSettings.code}: {describe_invalid(e)}", file=sys.stderr)
        raise SystemExit(2) from None


app = Celery("autonomy", include=["tasks.checks"])
configure(app, _settings_or_exit())


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


# --- one log format ------------------------------------------------------------------


# the process name on the log lines of each `celery` command
ROLES = {"worker": "celery-worker", "beat": "celery-beat", "flower": "flower"}


def celery_role(argv: list[str]) -> str | None:
    """``celery-worker``, ``celery-beat`` or ``flower`` when ``argv`` runs that ``celery``
    command (``celery ...`` or ``python -m celery ...``), else None."""
    # the program is .../bin/celery or .../celery/__main__.py (never, say, pytest -k worker)
    if not argv or "celery" not in os.path.normpath(argv[0]).split(os.sep)[-2:]:
        return None
    return next((ROLES[a] for a in argv[1:] if a in ROLES), None)


@setup_logging.connect
def _one_log_format(loglevel: Any = None, **_: Any) -> None:
    from app import logs

    logs.configure(get_settings(), process=celery_role(sys.argv) or "celery",
                   level=loglevel or None)


@celeryd_init.connect
def _log_format_from_the_start(instance: Any = None, **_: Any) -> None:
    # sent before the worker checks its privileges (a warning) and sets logging up
    _one_log_format()
    if instance is not None and get_settings().log_format == "json":
        instance.quiet = True  # no banner: JSON mode writes JSON lines only


def _log_format_before_the_command() -> None:
    """Configure logging as this module is imported by ``celery worker|beat|flower``:
    Flower never sends ``setup_logging`` (without a handler on the root logger, Tornado
    installs its own text one), and beat prints its banner before it does. In JSON mode,
    whatever Celery prints past ``logging`` becomes JSON lines too (``capture_stdout``)."""
    from app import logs

    role = celery_role(sys.argv)
    if role is None:
        return
    settings = get_settings()
    logs.configure(settings, process=role)
    if settings.log_format == "json":
        logs.capture_stdout()


@celeryd_after_setup.connect
def _name_the_worker(sender: Any = None, **_: Any) -> None:
    from app import logs

    logs.set_process_fields(worker=str(sender))


_log_format_before_the_command()

_task_log_tokens: dict[str, Any] = {}


@task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    from app import logs

    if task_id is not None:
        hostname = getattr(getattr(task, "request", None), "hostname", None)
        _task_log_tokens[task_id] = logs.bind(task_id=task_id, lane=None, worker=hostname,
                                              task_name=getattr(task, "name", None))


@task_postrun.connect
def _unbind_task(task_id: str | None = None, **_: Any) -> None:
    from app import logs

    token = _task_log_tokens.pop(task_id or "", None)
    if token is not None:
        with contextlib.suppress(ValueError):  # bound in another context: nothing to undo here
            logs.unbind(token)


# --- one beat at a time -----------------------------------------------------------------


class LeaderScheduler(PersistentScheduler):
    """Celery's scheduler, sending a due job only while this beat leads on a recently
    confirmed lease (``app.storage.beat_guard.may_send``). A job that falls due while the
    lease cannot be confirmed (Redis unreachable, or cut off from it) is skipped for that
    period, not sent late: a standby may already lead and send it."""

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        import redis

        from app.ops.checks import send_window
        from app.ops.run_locks import beat_may_send

        ctx = worker_context()
        if not beat_may_send(ctx):
            _beat_log.warning("not sending %s: this beat's leader lease is not confirmed "
                              "(Redis unreachable, or another beat leads)", entry.name)
            return
        # the message carries Redis's now: the task judges its age on Redis's clock
        try:
            headers = send_window.stamp(ctx, entry.options.get("headers"))
        except redis.RedisError as e:
            _beat_log.warning("not sending %s: Redis's clock is unreadable (%s)", entry.name, e)
            return
        # the stamp waited on Redis: a leader cut off meanwhile (its reply delayed until the
        # network healed) may no longer lead, and a fresh stamp would let the job run twice
        if not beat_may_send(ctx):
            _beat_log.warning("not sending %s: this beat's leader lease went unconfirmed "
                              "while it read Redis's clock", entry.name)
            return
        stamped = copy.copy(entry)
        stamped.options = {**entry.options, "headers": headers}
        super().apply_entry(stamped, producer=producer)


def belongs_here(role: str) -> None:
    """Start only on a database of this deployment (SPEC 4.12): a worker or beat pointed
    at another deployment's database logs why and exits 1 (it cannot recover in place)."""
    from app.errors import DeploymentMismatch
    from app.ops import deployment

    try:
        deployment.check_at_start(get_settings(), role)
    except DeploymentMismatch as e:
        logging.getLogger("app.deployment").critical("%s: %s", e.code, e.message)
        # SystemExit, not an exception: Celery logs and ignores a signal handler's errors
        raise SystemExit(1) from e


@celeryd_init.connect
def _worker_belongs_here(**_: Any) -> None:
    belongs_here("celery worker")


@beat_init.connect
def _lead_beat(**_: Any) -> None:
    """Before beat sends anything: check the database is this deployment's, then lead, or
    stand by until the leader's lock is free.

    Nothing here may end the leader logic: Celery logs an exception a ``beat_init``
    handler raises and carries on without it, and that beat then said "not sending ...:
    leader lease is not confirmed" forever (a Redis answering DENIED at start). So any
    error is retried with backoff until this beat leads (SPEC 4.7). Another deployment's
    database is the one exception: that exits 1 (``belongs_here``)."""
    from app.ops.run_locks import lead_beat

    belongs_here("beat")
    failures = 0
    while True:
        try:
            lead_beat(worker_context())
            return
        except Exception as e:  # the leader logic must not die
            failures += 1
            wait_s = min(2.0 ** failures, 30.0)
            _beat_log.warning("beat cannot lead yet (%s: %s); retrying in %gs",
                              type(e).__name__, e, wait_s)
            time.sleep(wait_s)


# --- remote control -------------------------------------------------------------------


def locks_answer() -> dict[str, Any]:
    """The held run-locks and the beat leader lease (an error answer if unreadable)."""
    from app.errors import AutonomyError
    from app.ops.run_locks import view

    try:
        return view(worker_context())
    except AutonomyError as e:
        return e.to_wire()


def _secs(ms: int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f} s"


def lock_lines(answer: dict[str, Any]) -> dict[str, str]:
    """One readable line per held run-lock, keyed ``run-lock <job>``, and the beat lease."""
    lines = {}
    for lk in answer.get("runLocks") or []:
        lines[f"run-lock {lk['job']}"] = (
            f"holder {lk['holder']} · elapsed {_secs(lk['elapsedMs'])} of "
            f"{_secs(lk['budgetMs'])} budget · "
            f"{'OVER BUDGET' if lk['overBudget'] else 'within budget'} · "
            f"{'holder alive' if lk['holderAlive'] else 'holder dead (heartbeat stopped)'} · "
            f"since {lk['startedAt']}")
    beat = answer.get("beat")
    if beat is not None:
        lines["beat leader lease"] = (
            f"{beat['leader'] or 'NONE'} · since {beat['since']} · renewed "
            f"{beat['renewedAt']} · TTL {_secs(beat['ttlMs'])} · standbys "
            f"{', '.join(beat['standbys']) or 'none'}")
    return lines


@inspect_command()
def run_locks(state: Any, **_: Any) -> dict[str, Any]:
    """List held run-locks (job, holder, elapsed, budget, over budget, holder alive) and
    the beat leader lease."""
    return locks_answer()


class RunLocksInStats(bootsteps.StartStopStep):
    """Adds the held run-locks and the beat lease to the worker's stats, read fresh on
    each ``stats`` request: Flower's worker page shows them (tab "Other"). A StartStopStep
    (with nothing to start) because only those are listed in the worker's steps, whose
    ``info()`` the stats collect."""

    def info(self, worker: Any) -> dict[str, Any]:
        answer = locks_answer()
        if "error" in answer:  # Redis down: say so, never break the worker's stats
            return {"runLocks": f"unreadable: {answer['error']}: {answer['message']}"}
        return {**lock_lines(answer), **answer}


app.steps["worker"].add(RunLocksInStats)


# --- the consumer watchdog ------------------------------------------------------------

_watch: Watch | None = None


@task_received.connect
@task_revoked.connect
def _taken(**_: Any) -> None:
    if _watch is not None:
        _watch.taken()


class ConsumerWatchdogStep(bootsteps.StartStopStep):
    """Runs ``app.celery_watchdog`` in the worker's main process: a worker that takes no
    message while messages wait and its pool has room stops with exit code 70, for its
    supervisor to restart (``celery_watchdog_s``; 0: off)."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.watchdog: ConsumerWatchdog | None = None

    def start(self, worker: Any) -> None:
        global _watch
        s = get_settings()
        if not s.celery_watchdog_s:
            return
        from celery.worker import state

        queue = s.celery_queue
        _watch = Watch(stuck_after_s=s.celery_watchdog_s)

        def waiting() -> int | None:
            try:  # (a passive declare is NOT_FOUND on Redis while the queue is empty)
                with worker.app.connection_for_read() as conn:
                    return int(conn.default_channel.queue_declare(queue=queue).message_count)
            except Exception:  # the broker cannot say (down, stalled)
                return None

        self.watchdog = ConsumerWatchdog(
            watch=_watch, queue=queue, waiting=waiting,
            pool_full=lambda: len(state.active_requests) >= (worker.concurrency or 1),
            stop_worker=stop_celery_worker, interval_s=max(0.5, s.celery_watchdog_s / 4))
        self.watchdog.start()

    def stop(self, worker: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()


app.steps["worker"].add(ConsumerWatchdogStep)
