"""``LaneWorker``: consume one lane — claim, run a handler, complete — for workers written
in Python, and the loop under ``autonomy worker`` (whose handler runs a command).

::

    def review(task):
        if "tests" not in task["payload"]:
            raise ValidationFailed("missing tests")   # failure: counts toward the breaker
        return {"approved": True}                     # success: kept as the task's result

    LaneWorker("reviewer", review).run()

Progress lines go through ``logging`` with ``worker``, ``lane`` and ``task_id`` fields
(``app.logs.configure`` gives them the process's format; ``say=`` takes plain lines instead).

While the handler runs a thread heartbeats the lease every ``lease_ttl / 3`` so a slow task
keeps it. A paused lane (``lane_paused``) and an unreachable service are waited out with a
capped backoff, said once per episode; an empty lane is waited on by a claim with
``waitMs`` that returns when work arrives (push pickup, no polling). A stop (the event,
or SIGTERM/SIGINT when ``run`` installs handlers) stops claiming; the running
task finishes. A handler that is interrupted (``KeyboardInterrupt``, ``SystemExit``) or
raises ``ReleaseTask`` gives its lease back, so the task is never left in progress until
its lease expires. An outcome that cannot be reported (the service is down) is retried,
heartbeating, until the lease runs out, then kept: if a claim brings the task back to
this worker, the kept outcome is reported and the task is not run again (SPEC 4.7). A
complete refused because the lease was superseded is logged "outcome refused".

Clock skew (SPEC 4.9): every claim and heartbeat answer carries ``serverTime``, the
database's time it was decided by. The worker measures its own clock against it (the
middle of the request's round trip, so the error is at most half of it), reports the skew
with its next requests (``clockSkewMs``: status and ``/metrics`` show it), reckons its
lease's time left on the database's clock, and logs a warning when it is off by more
than ``clock_skew_warn_s`` -- once, and again after it has been back in line.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app import logs
from app.backoff import Backoff
from app.clock import utcnow
from app.errors import (
    AuthError,
    AutonomyError,
    InvalidInput,
    LanePaused,
    NotInProgress,
    StaleLease,
    TaskCancelled,
    TaskNotFound,
    Unavailable,
)
from app.workers.client import Client, LocalClient
from app.workers.job import (
    Handler,
    Job,
    JobHandler,
    ReleaseTask,
    ValidationFailed,
    WorkerStats,
    default_worker_name,
)
from app.workers.prefetch import AUTO, AUTO_MAX, AutoPrefetch, prefetch_setting

__all__ = ["Job", "JobHandler", "LaneWorker", "ReleaseTask", "ValidationFailed",
           "WorkerStats", "default_worker_name"]

log = logging.getLogger(__name__)

Say = Callable[[str], None]
_LOST = (StaleLease, NotInProgress, TaskNotFound, TaskCancelled)  # the lease is gone for good
_LOST_CODES = frozenset(e.code for e in _LOST)
KEPT_MAX = 256  # outcomes kept for tasks whose lease ran out before they were reported
# the only refusals that stop a worker: waiting or moving on will not cure them
_FATAL = (AuthError, InvalidInput)


def say_stderr(line: str) -> None:
    """Log one progress line (``app.logs`` gives it the process's format, on stderr),
    escaping what cannot be encoded (a lone surrogate from a garbled answer)."""
    log.info(line.encode("utf-8", "backslashreplace").decode("utf-8"))


def _storable(text: str) -> str:
    """``text`` without what the server refuses (NUL, lone surrogates)."""
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(eq=False)
class _Beat:
    """A running lease as the heartbeat thread sees it."""

    job: Job
    due: float  # monotonic time of its next heartbeat
    done: bool = False
    complained: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while one is sent


class LaneWorker:
    """Claims tasks from ``lane`` one at a time and hands each to ``handler``.

    ``client`` defaults to a ``LocalClient`` from the environment's settings (closed by
    ``close()``). Each worker holds at most one lease per lane, so run several workers
    (each with its own name) for parallelism, and raise the lane's ``maxInFlight``.
    With ``prefetch=K`` it holds up to K (each counted by ``maxInFlight``), heartbeats
    each, runs them one after another and completes the successes together;
    ``prefetch="auto"`` picks K from how long its handler takes (``app.workers.prefetch``):
    1 until a task has run, then as many as run in ``worker_prefetch_auto_wait_ms`` (50 ms),
    at most 10.
    """

    def __init__(self, lane: str, handler: Handler, *, worker_name: str | None = None,
                 client: Client | None = None, heartbeat_interval_s: float | None = None,
                 idle_backoff_s: tuple[float, float] = (0.1, 2.0),
                 pause_backoff_s: tuple[float, float] = (1.0, 30.0),
                 say: Say | None = None, prefetch: int | str = 1) -> None:
        self._owns_client = client is None
        self.client = client if client is not None else LocalClient()
        s = self.client.settings
        from app import validate

        self.lane = validate.assignee(lane, s)
        self.name = validate.worker(worker_name or default_worker_name(), s)
        self.handler = handler
        # leases held at once (issue 22): 1 is a claim and a complete per task; K claims up
        # to K, runs them in turn and completes the successes in one request that hands
        # over the next K (``_run_batch``); "auto": K follows the handler's run time
        k = prefetch_setting(prefetch)
        self.prefetch = AUTO_MAX if k == AUTO else int(k)
        self._prefetched: list[Job] = []  # the rest of the last claim's leases
        self._queued: tuple[_Beat, ...] = ()  # their heartbeats while they wait their turn
        self._fixed_beat_s = heartbeat_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s or max(0.05, s.lease_ttl_s / 3)
        # an auto prefetch's wait: at most a heartbeat period, so a short lease is not
        # left to its waiting leases' heartbeats on a slow machine
        self._auto = AutoPrefetch(wait_s=min(s.worker_prefetch_auto_wait_ms / 1000,
                                             self.heartbeat_interval_s)) if k == AUTO else None
        self.idle = Backoff(*idle_backoff_s)
        # the last claim found the lane empty: the next one waits for work (push pickup)
        self._lane_empty = False
        self.pause = Backoff(*pause_backoff_s)
        self.say = say  # None: log lines through ``logging`` (app.logs), with their fields
        self.stats = WorkerStats()
        self._waiting_on: str | None = None  # the code we are waiting out, said once
        # outcomes that could not be reported before their lease ran out (SPEC 4.7), by
        # task id: reported, not run again, if this worker gets the task back
        self._kept: dict[int, tuple[str, str | None, dict[str, Any] | None]] = {}
        # the next claim's answer, handed over by the last complete (``claimNext``): a
        # worker's cycle is then one request; ``_want_next`` says whether to ask for it
        self._next: dict[str, Any] | None = None
        self._want_next = False
        self._claim_n: int | None = None  # ``max`` of the next claim (a prefetch's)
        self._beater: object | None = None  # the live heartbeat thread's identity
        self._beating: _Beat | None = None  # the lease it keeps
        self._beat_wake = threading.Event()
        self._beat_next = 0.0  # when the heartbeat thread wakes next (monotonic)
        # this host's clock minus the database's (s), measured from answers' serverTime
        self.clock_skew_s: float | None = None
        self._skew_warned = False

    def close(self) -> None:
        """Close the client if this worker built it."""
        if self._owns_client:
            self.client.close()

    def _log(self, text: str, *, task_id: int | None = None, level: int = logging.INFO) -> None:
        if self.say is not None:
            self.say(f"worker {self.name} [{self.lane}]: {text}")
            return
        fields: dict[str, object] = {"worker": self.name, "lane": self.lane}
        if task_id is not None:
            fields["task_id"] = task_id
        log.log(level, text, extra=fields)

    # --- the loop -------------------------------------------------------------------

    def run(self, stop_event: threading.Event | None = None, max_tasks: int | None = None,
            *, handle_signals: bool | None = None) -> WorkerStats:
        """Work until ``stop_event`` is set or ``max_tasks`` tasks are finished.

        Without a ``stop_event``, SIGTERM/SIGINT stop the loop (when called from the main
        thread): the running task finishes first; a second signal interrupts it and its
        lease is released. Answers the counts.
        """
        stop = stop_event or threading.Event()
        if handle_signals is None:
            handle_signals = stop_event is None
        with _stop_on_signals(stop, self._log) if handle_signals else _nothing():
            # the heartbeat thread starts now, not on the first task's path (pickup)
            self._ensure_beater()
            try:
                while not stop.is_set():
                    if max_tasks is not None and self.stats.finished >= max_tasks:
                        break
                    if self._batching():
                        self._run_batch(stop, max_tasks)
                        continue
                    self._claim_n = None  # one lease: the plain claim (Redis's fast path)
                    job = self.claim_one(stop)
                    if job is not None:
                        # ask the complete for the next claim unless this is the last one
                        self._want_next = max_tasks is None \
                            or self.stats.finished + 1 < max_tasks
                        # every line logged while the task is worked on names it (app.logs)
                        with logs.bound(task_id=job.task_id, lane=self.lane,
                                        worker=self.name):
                            self.work(job)
            finally:
                self._release_handed_over()
                self._end_beater()
        return self.stats

    def _k(self) -> int:
        """Leases the next claim asks for: the prefetch, or what ``auto`` picks now."""
        return self._auto.k() if self._auto is not None else self.prefetch

    def _batching(self) -> bool:
        """Whether the next turn is a batch: K > 1, or a hand-over of several leases (an
        ``auto`` worker whose K fell to 1 runs the ones it already holds first)."""
        held = self._next.get("leases") if self._next is not None else None
        return self._k() > 1 or (isinstance(held, list) and len(held) > 1)

    def _release_handed_over(self) -> None:
        """A lease the last complete handed over that will not be worked: give it back."""
        nxt, self._next = self._next, None
        jobs = self._jobs(nxt or {}, threading.Event())
        jobs += self._prefetched
        self._prefetched = []
        for job in jobs:
            self._release(job, "the worker is stopping")

    def _jobs(self, answer: dict[str, Any], stopping: threading.Event) -> list[Job]:
        """Every job a claim's answer grants (``leases`` of a prefetch, else its one)."""
        many = answer.get("leases")
        if isinstance(many, list) and many:
            return [j for j in (self._job(x if isinstance(x, dict) else {}, stopping)
                                for x in many) if j is not None]
        job = self._job(answer, stopping)
        return [] if job is None else [job]

    def _job(self, answer: dict[str, Any], stopping: threading.Event) -> Job | None:
        """The job a claim's answer grants; None when it has no usable task and lease."""
        task, lease = answer.get("task"), answer.get("lease")
        if not isinstance(task, dict) or not isinstance(task.get("id"), int) \
                or not isinstance(lease, dict) or not isinstance(lease.get("token"), str):
            return None
        return Job(task=task, lease_token=lease["token"], lease_expires_at=lease.get("expiresAt"),
                   lane=self.lane, worker=self.name, stopping=stopping)

    def claim_one(self, stop: threading.Event) -> Job | None:
        """Try one claim; waits out pauses, outages and an empty lane before answering
        ``None``. Refusals that waiting cannot cure (bad input, auth) are raised; an answer
        the worker cannot use (a server error, a garbled body) is logged and the claim
        retried -- a retried claim gets back the lease the lost answer granted."""
        wait_ms = self.client.claim_wait_ms if self._lane_empty else None
        asked = time.monotonic()
        handed, self._next = self._next, None
        try:
            answer = handed if handed is not None \
                else self._timed(lambda: self.client.claim(
                    self.lane, self.name, wait_ms=wait_ms, clock_skew_ms=self._skew_ms(),
                    max_n=self._claim_n))
        except LanePaused as e:
            self._wait(stop, self.pause, e, "waiting for a resume")
            return None
        except Unavailable as e:
            self._wait(stop, self.pause, e, "retrying")
            return None
        except _FATAL:
            raise
        except AutonomyError as e:  # the server failed on this claim: not on every claim
            self._waiting_on = None
            self._wait(stop, self.pause, e, "claiming again")
            return None
        except Exception as e:  # e.g. a database deadlock reported raw: transient
            self._wait(stop, self.pause, AutonomyError(f"{type(e).__name__}: {e}"), "retrying")
            return None
        if self._waiting_on is not None:
            self._log(f"claiming again (was: {self._waiting_on})")
            self._waiting_on = None
        self.pause.reset()
        task, lease = answer.get("task"), answer.get("lease")
        if task is None and answer.get("guard") is None:  # the lane is empty
            if not self._lane_empty:  # wait for work in the next claim (push pickup)
                self._lane_empty = True
            elif time.monotonic() - asked < (wait_ms or 0) / 2000:
                stop.wait(self.idle.step())  # a server that does not wait: poll instead
            return None
        if task is None or lease is None:  # full with others' leases
            stop.wait(self.idle.step())
            return None
        job = self._job(answer, stop)
        if job is None:
            self._unusable_claim(task, lease)
            stop.wait(self.pause.step())
            return None
        self.idle.reset()
        self._lane_empty = False
        self.stats.claimed += 1
        if self._claim_n is not None:  # a prefetch: the rest of its leases wait their turn
            self._prefetched = self._jobs(answer, stop)[1:]
            self.stats.claimed += len(self._prefetched)
        # ``attempts`` counts failures so far (docs/workers.md), not claims
        failures = int(job.task.get("attempts") or 0)
        self._log(f"task {job.task_id}: claimed ({failures} failure"
                  f"{'' if failures == 1 else 's'} so far)", task_id=job.task_id)
        return job

    def _unusable_claim(self, task: Any, lease: Any) -> None:
        """A claim answer without a usable task: fail the task when it can be named."""
        tid = task.get("id") if isinstance(task, dict) else None
        token = lease.get("token") if isinstance(lease, dict) else None
        self._log(f"task {tid}: the claim answer cannot be used "
                  f"(task {type(task).__name__}, lease {type(lease).__name__})")
        if isinstance(tid, int) and isinstance(token, str):
            job = Job(task={"id": tid}, lease_token=token, lease_expires_at=None,
                      lane=self.lane, worker=self.name, stopping=threading.Event())
            self._complete(job, "failure", "the claim answer for this task could not be "
                           "used by the worker", None)

    def _wait(self, stop: threading.Event, backoff: Backoff, err: AutonomyError,
              doing: str) -> None:
        if self._waiting_on != err.code:
            self._waiting_on = err.code
            self._log(f"{err.code}: {err.message}; {doing} (backoff up to "
                      f"{backoff.max_s:g}s)", level=logging.WARNING)
        stop.wait(backoff.step())

    def work(self, job: Job) -> None:
        """Run the handler on a claimed task under a heartbeat, then record the outcome."""
        kept = self._kept.pop(job.task_id, None)
        if kept is not None:  # it already ran here: report what it answered, never rerun
            self._log(f"task {job.task_id}: back under this worker's lease; reporting the "
                      "outcome it already has instead of running it again")
            self._report(job, kept)
            return
        if job.stopping.is_set():  # a stop arrived while the claim was on its way
            self._release(job, "stopping before the task started")
            return
        alone = self._beater is None  # called outside ``run``: its thread ends here
        beat = self._start_beating(job)
        try:
            outcome = self._call_handler(job)
        except BaseException:  # interrupted: give the lease back, then let it propagate
            self._stop_beating(beat)
            self._release(job, "interrupted")
            raise
        finally:
            self._stop_beating(beat)
            if alone:
                self._end_beater()
        if not self._gone_while_working(job):
            self._report(job, outcome)

    def _report(self, job: Job, outcome: tuple[str, str | None, dict[str, Any] | None]
                ) -> None:
        kind, value, result = outcome
        if kind == "release":
            self._release(job, value or "handler asked")
        else:
            self._complete(job, kind, value, result)

    def _call_handler(self, job: Job) -> tuple[str, str | None, dict[str, Any] | None]:
        if self._auto is None:
            return self._handle(job)
        began = time.monotonic()
        try:
            return self._handle(job)
        finally:
            self._auto.observe(time.monotonic() - began)

    def _handle(self, job: Job) -> tuple[str, str | None, dict[str, Any] | None]:
        try:
            if isinstance(self.handler, JobHandler):
                result = self.handler.handle_job(job)
            else:
                result = self.handler(job.task)
        except ValidationFailed as e:
            return "failure", e.reason, e.result
        except ReleaseTask as e:
            return "release", str(e) or None, None
        except Exception as e:
            return "failure", str(e).strip() or type(e).__name__, None
        if result is not None and not isinstance(result, dict):
            result = {"value": result}
        return "success", None, result

    # --- a prefetch: K leases at once (issue 22) -------------------------------------

    def _run_batch(self, stop: threading.Event, max_tasks: int | None) -> None:
        """Claim up to K leases (or take those the last complete handed over), run them in
        turn -- each heartbeated from its grant until its outcome is in -- and complete
        the successes in one request that hands over the next K. Failures, releases and
        kept outcomes are reported one by one, as without a prefetch."""
        left = None if max_tasks is None else max_tasks - self.stats.finished
        k = self._k()
        self._claim_n = k if left is None else max(1, min(k, left))
        self._want_next = False  # a single complete (a fallback) hands nothing over
        first = self.claim_one(stop)
        if first is None:
            return
        jobs, self._prefetched = [first, *self._prefetched], []
        beats = [_Beat(j, due=time.monotonic() + self._beat_interval(j)) for j in jobs]
        self._queued = tuple(beats)
        self._beat_wake.set()  # the thread may sleep past the first one's beat
        done: list[tuple[Job, dict[str, Any] | None]] = []
        ran = 0
        try:
            for job, beat in zip(jobs, beats, strict=True):
                if stop.is_set():
                    break
                ran += 1
                with logs.bound(task_id=job.task_id, lane=self.lane, worker=self.name):
                    outcome = self._run_queued(job, beat)
                if outcome is None:
                    continue
                if outcome[0] == "success":
                    done.append((job, outcome[2]))
                else:
                    self._report(job, outcome)
        finally:
            for b in beats:
                self._stop_beating(b)
            self._queued = ()
            for job in jobs[ran:]:  # a stop before their turn: give them back at once
                self._release(job, "the worker is stopping")
            finished = self.stats.finished + len(done)
            more = not stop.is_set() and (max_tasks is None or finished < max_tasks)
            k = self._k()
            n = k if max_tasks is None else max(1, min(k, max_tasks - finished))
            self._complete_batch(done, next_n=n if more else None)

    def _run_queued(self, job: Job, beat: _Beat
                    ) -> tuple[str, str | None, dict[str, Any] | None] | None:
        """One prefetched job's outcome; None when there is none to report (its lease was
        lost while it waited or ran, it was cancelled)."""
        kept = self._kept.pop(job.task_id, None)
        if kept is not None:  # it already ran here: report what it answered, never rerun
            self._stop_beating(beat)
            return kept
        if job.lease_lost.is_set():  # a heartbeat was refused while it waited its turn
            self._stop_beating(beat)
            self._count_lost(job, "before its turn; not run")
            return None
        try:
            outcome = self._call_handler(job)
        except BaseException:  # interrupted: give the lease back, then let it propagate
            self._stop_beating(beat)
            self._release(job, "interrupted")
            raise
        self._stop_beating(beat)
        return None if self._gone_while_working(job) else outcome

    def _gone_while_working(self, job: Job) -> bool:
        """Whether the lease went while the handler ran (the task was cancelled, or the
        lease was lost): counted and logged, and its outcome is not reported."""
        if not job.lease_lost.is_set() and not job.cancelled.is_set():
            return False
        self._count_lost(job, "while working; outcome dropped")
        return True

    def _count_lost(self, job: Job, when: str) -> None:
        """A lease its heartbeat found gone (``job.cancelled``: by a cancel) ``when``."""
        cancelled = job.cancelled.is_set()
        self._count_gone(job, cancelled, f"{'cancelled' if cancelled else 'lease lost'} {when}")

    def _count_gone(self, job: Job, cancelled: bool, text: str) -> None:
        """A lease gone before its outcome was recorded: counted as cancelled (the task
        was cancelled) or lost (it expired and moved on), and logged -- as the SDK's
        worker counts them."""
        if cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.lost += 1
        self._log(f"task {job.task_id}: {text}", task_id=job.task_id, level=logging.WARNING)

    def _complete_batch(self, done: list[tuple[Job, dict[str, Any] | None]], *,
                        next_n: int | None) -> None:
        """The successes in one ``complete_many`` (with the next ``next_n`` leases handed
        over); each item's refusal is its own. A request the server refuses as a whole
        (an unstorable result) is sent again one complete at a time."""
        if not done:
            return
        items = [(j.task_id, j.lease_token, r) for j, r in done]
        nxt = (self.lane, self.name) if next_n is not None else None
        try:
            answer = self._retrying(lambda: self._timed(lambda: self.client.complete_many(
                items, claim_next=nxt, max_n=next_n, clock_skew_ms=self._skew_ms()),
                "next"), job=done[0][0])
        except AuthError:
            raise
        except AutonomyError:
            for job, result in done:
                self._complete(job, "success", None, result)
            return
        if answer is None:  # the leases ran out first: keep the outcomes
            for job, result in done:
                self._keep(job, ("success", None, result))
            return
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(done):
            results = [{}] * len(done)
        for (job, result), res in zip(done, results, strict=True):
            if isinstance(res, dict) and res.get("ok") is True:
                self.stats.succeeded += 1
                self._log(f"task {job.task_id}: done", task_id=job.task_id)
            elif isinstance(res, dict) and res.get("error") in _LOST_CODES:
                self._count_gone(job, res["error"] == TaskCancelled.code,
                                 f"outcome refused ({res['error']}): {res.get('message')}")
            else:  # anything else: the one-task path answers it in full
                self._complete(job, "success", None, result)
        if isinstance(answer.get("next"), dict):
            self._next = answer["next"]

    # --- heartbeats: one thread for the worker's life ---------------------------------
    # It sleeps until the running lease is due a beat (a third of the lease after the last
    # one), so a task shorter than that costs it nothing: no wake-up, no hand-over between
    # threads on the task's path.

    def _start_beating(self, job: Job) -> _Beat:
        beat = _Beat(job, due=time.monotonic() + self._beat_interval(job))
        self._beating = beat
        if not self._ensure_beater() and beat.due < self._beat_next:
            self._beat_wake.set()  # the thread sleeps past this lease's first beat
        return beat

    def _ensure_beater(self) -> bool:
        """Start the heartbeat thread unless one runs; True when it was started."""
        if self._beater is not None:
            return False
        self._beater = me = object()
        threading.Thread(target=self._beat_loop, args=(me,), name=f"heartbeat-{self.name}",
                         daemon=True).start()
        return True

    def _end_beater(self) -> None:
        """The heartbeat thread ends (it sees it is no longer the live one)."""
        self._beater = None
        self._beat_wake.set()

    def _stop_beating(self, beat: _Beat) -> None:
        """End this lease's heartbeats; answers once none is in flight. A heartbeat stuck
        on the network for 5 s (a cut-off host) is left to time out on its own: the next
        lease gets a new heartbeat thread, and the stuck one ends once its call returns."""
        beat.done = True
        if self._beating is beat:
            self._beating = None
        if beat.lock.acquire(timeout=5):
            beat.lock.release()
        else:
            self._beater = None

    def _beat_loop(self, me: object) -> None:
        while self._beater is me:
            beat = self._beating
            if self._queued:  # a prefetch: the lease due first, running or waiting
                beat = min((b for b in (beat, *self._queued) if b is not None and not b.done),
                           key=lambda b: b.due, default=None)
            now = time.monotonic()
            if beat is None or beat.done or beat.due > now:
                self._beat_next = beat.due if beat is not None and not beat.done \
                    else now + self.heartbeat_interval_s
                self._beat_wake.wait(max(0.0, self._beat_next - now))
                self._beat_wake.clear()
                continue
            with beat.lock:
                if not beat.done:
                    self._heartbeat(beat)
            beat.due = time.monotonic() + self._beat_interval(beat.job)

    def _heartbeat(self, beat: _Beat) -> None:
        job = beat.job
        try:
            answer = self._timed(lambda: self.client.heartbeat(
                job.task_id, job.lease_token, clock_skew_ms=self._skew_ms()))
        except _LOST as e:
            if isinstance(e, TaskCancelled):  # set first: a handler that sees the lease
                job.cancelled.set()           # lost knows why
            job.lease_lost.set()
            beat.done = True
            if isinstance(e, TaskCancelled):
                self._log(f"task {job.task_id}: cancelled; stopping its work",
                          task_id=job.task_id, level=logging.WARNING)
            else:
                self._log(f"task {job.task_id}: heartbeat refused ({e.code}); lease lost",
                          task_id=job.task_id, level=logging.WARNING)
            return
        except Exception as e:  # transient: keep beating, the lease has slack
            if not beat.complained:
                self._log(f"task {job.task_id}: heartbeat failed ({e}); retrying",
                          task_id=job.task_id, level=logging.WARNING)
                beat.complained = True
            return
        job.heartbeats += 1
        job.lease_expires_at = answer.get("lease", {}).get("expiresAt")

    def _beat_interval(self, job: Job) -> float:
        """A third of the lease: of our settings' TTL, or of what the lease answer says is
        left when that is shorter (a server with a shorter TTL than ours)."""
        if self._fixed_beat_s is not None or not job.lease_expires_at:
            return self.heartbeat_interval_s
        try:
            left = (datetime.fromisoformat(job.lease_expires_at)
                    - self._db_now()).total_seconds()
        except ValueError:
            return self.heartbeat_interval_s
        if left <= 0:  # clocks disagree; keep to our own setting
            return self.heartbeat_interval_s
        return max(0.05, min(self.heartbeat_interval_s, left / 3))

    # --- outcomes -------------------------------------------------------------------

    def _complete(self, job: Job, outcome: str, reason: str | None,
                  result: dict[str, Any] | None) -> None:
        s = self.client.settings
        if outcome == "failure":
            reason = _storable((reason or "failed").strip()[: s.reason_max_len]) or "failed"
        try:
            nxt = (self.lane, self.name) if self._want_next and not job.stopping.is_set() \
                else None
            answer = self._retrying(lambda: self._timed(lambda: self.client.complete(
                job.task_id, job.lease_token, outcome=outcome, reason=reason, result=result,
                claim_next=nxt, clock_skew_ms=self._skew_ms()), "next"), job=job)
        except InvalidInput as e:  # e.g. an unserialisable result: still close the task
            if outcome == "success":
                return self._complete(job, "failure", f"invalid result: {e.message}", None)
            if result is not None:
                return self._complete(job, "failure", reason, None)
            self._log(f"task {job.task_id}: complete refused ({e.code}: {e.message})",
                      task_id=job.task_id, level=logging.WARNING)
            return self._release(job, "its failure could not be recorded")
        except _LOST as e:  # e.g. another lease completed it: the outcome is not ours
            self._count_gone(job, isinstance(e, TaskCancelled),
                             f"outcome refused ({e.code}): {e.message}")
            return
        except AuthError:
            raise
        except AutonomyError as e:  # the server failed on this task: record that instead
            self._log(f"task {job.task_id}: complete answered {e.code}: {e.message}")
            if outcome == "success" or result is not None:
                return self._complete(job, "failure", f"the server could not record the "
                                      f"outcome ({outcome}): {e.code}", None)
            return self._release(job, f"its outcome could not be recorded ({e.code})")
        if answer is None:  # its lease ran out first: keep it for a claim that brings it back
            self._keep(job, (outcome, reason, result))
            return
        if isinstance(answer.get("next"), dict):
            self._next = answer["next"]
        if answer.get("guard") == "duplicate_complete_guard":  # an earlier try was recorded
            self.stats.succeeded += 1
            self._log(f"task {job.task_id}: done (an earlier complete was recorded; its "
                      "answer did not reach this worker)", task_id=job.task_id)
            return
        if outcome == "success":
            self.stats.succeeded += 1
            self._log(f"task {job.task_id}: done", task_id=job.task_id)
            return
        self.stats.failed += 1
        line = (f"task {job.task_id}: failed ({reason}); fingerprint "
                f"{answer.get('failureFingerprint')} x{answer.get('fingerprintCount')}")
        if answer.get("lanePaused"):
            line += "; the lane is paused by the breaker"
        self._log(line, task_id=job.task_id)

    def _release(self, job: Job, why: str) -> None:
        try:
            answer = self._retrying(lambda: self.client.release(job.task_id, job.lease_token))
        except _LOST as e:
            self._log(f"task {job.task_id}: release refused ({e.code}); it moved on",
                      task_id=job.task_id, level=logging.WARNING)
            return
        except AutonomyError as e:  # nothing more to do: the lease expires on its own
            self._log(f"task {job.task_id}: release refused ({e.code}: {e.message})",
                      task_id=job.task_id, level=logging.WARNING)
            return
        if answer is not None:
            self.stats.released += 1
            self._log(f"task {job.task_id}: lease released ({why})", task_id=job.task_id)

    def _keep(self, job: Job, outcome: tuple[str, str | None, dict[str, Any] | None]) -> None:
        self._kept[job.task_id] = outcome
        while len(self._kept) > KEPT_MAX:
            del self._kept[next(iter(self._kept))]
        self._log(f"task {job.task_id}: outcome kept ({outcome[0]}); reported, not run "
                  "again, if the task comes back to this worker", task_id=job.task_id,
                  level=logging.WARNING)

    def _retrying(self, fn: Callable[[], dict[str, Any]], *, for_s: float = 30.0,
                  job: Job | None = None) -> dict[str, Any] | None:
        """Retry through outages; None when it gave up. With a ``job``, until its lease runs
        out, heartbeating it between tries when the service answers (SPEC 4.7: the
        outcome is not given up while the lease may still be ours; after, the caller keeps
        it); without, for ``for_s`` (past that the lease expires and self-heal requeues
        the task, so giving up loses nothing)."""
        backoff, start = Backoff(0.2, 5.0), time.monotonic()
        last_beat = start
        while True:
            try:
                return fn()
            except AutonomyError as e:
                if not isinstance(e, Unavailable):
                    raise
                why = e.message
            except Exception as e:  # e.g. a database deadlock reported raw: retry it
                why = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            left = self._lease_left_s(job) if job and job.lease_expires_at \
                else for_s - (now - start)
            if left <= 0:
                self._log(f"giving up after {now - start:.0f}s: {why}", level=logging.WARNING)
                return None
            if job is not None and now - last_beat >= self._beat_interval(job):
                last_beat = now
                self._beat_once(job)
            time.sleep(min(backoff.step(), left))

    def _lease_left_s(self, job: Job) -> float:
        if not job.lease_expires_at:
            return 0.0
        try:
            return (datetime.fromisoformat(job.lease_expires_at)
                    - self._db_now()).total_seconds()
        except ValueError:
            return 0.0

    # --- the one clock: this host's skew against the database's ---------------------

    def _timed(self, call: Callable[[], dict[str, Any]], nested: str | None = None
               ) -> dict[str, Any]:
        """``call()``'s answer, its ``serverTime`` (or its ``nested`` answer's) measured
        against this host's clock at the middle of the round trip."""
        sent = time.time()
        answer = call()
        got = answer.get(nested) if nested is not None else answer
        if isinstance(got, dict):
            self._measure(got.get("serverTime"), (sent + time.time()) / 2)
        return answer

    def _measure(self, server_time: Any, local_s: float) -> None:
        """Take one skew reading; warn when it is past ``clock_skew_warn_s``."""
        if not isinstance(server_time, str):
            return
        try:
            skew = local_s - datetime.fromisoformat(server_time).timestamp()
        except ValueError:
            return
        self.clock_skew_s = skew
        limit = self.client.settings.clock_skew_warn_s
        if abs(skew) > limit and not self._skew_warned:
            self._skew_warned = True
            way = "ahead of" if skew > 0 else "behind"
            self._log(f"this host's clock is {abs(skew):.1f}s {way} the database's (more "
                      f"than clock_skew_warn_s={limit:g}); leases follow the database's "
                      "clock, but this host's times and logs are off: fix its time "
                      "sync (NTP)", level=logging.WARNING)
        elif abs(skew) <= limit and self._skew_warned:
            self._skew_warned = False
            self._log(f"this host's clock is back within {limit:g}s of the database's "
                      f"({skew:+.1f}s)")

    def _skew_ms(self) -> int | None:
        """The last skew reading in ms, as reported with requests; None before any."""
        if self.clock_skew_s is None:
            return None
        from app.validate import CLOCK_SKEW_MS_MAX  # never a report the server refuses

        return max(-CLOCK_SKEW_MS_MAX, min(CLOCK_SKEW_MS_MAX, round(self.clock_skew_s * 1000)))

    def _db_now(self) -> datetime:
        """The database's time now, as this host reckons it (its clock less its skew)."""
        now = utcnow()
        return now if self.clock_skew_s is None else now - timedelta(seconds=self.clock_skew_s)

    def _beat_once(self, job: Job) -> None:
        """One heartbeat while an outcome waits to be reported (best effort)."""
        try:
            answer = self._timed(lambda: self.client.heartbeat(
                job.task_id, job.lease_token, clock_skew_ms=self._skew_ms()))
        except Exception:  # refused or down: the complete's own answer will say which
            return
        job.heartbeats += 1
        job.lease_expires_at = answer.get("lease", {}).get("expiresAt")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _stop_on_signals(stop: threading.Event, log: Say) -> Iterator[None]:
    """First SIGTERM/SIGINT: stop claiming. Second: interrupt (the lease is released)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log(f"{signal.Signals(signum).name}: stopping after the running task "
            "(send it again to interrupt)")

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
