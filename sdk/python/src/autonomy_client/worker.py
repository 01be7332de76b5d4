"""``LaneWorker``: consume one lane over HTTP -- claim, run a handler, complete.

::

    def review(task):
        if "tests" not in task["payload"]:
            raise ValidationFailed("missing tests")   # failure: counts toward the breaker
        return {"approved": True}                     # success: kept as the task's result

    with Client("http://autonomy:8000", token) as client:
        LaneWorker("reviewer", review, client=client).run()

- **Push pickup**: once a claim finds the lane empty, the next carries ``waitMs`` and the
  server holds it until a task arrives (a long poll), so an idle worker does not poll.
- **Heartbeats**: while the handler runs, a thread extends the lease every third of what
  is left of it, so a slow task keeps its lease; a heartbeat refused because the lease is
  gone sets ``job.lease_lost`` and the outcome is dropped.
- **Outages**: a paused lane and an unreachable API are waited out with a capped backoff.
  An outcome that cannot be reported is retried (heartbeating) until its lease runs out,
  then kept: if a claim brings the task back to this worker, the kept outcome is reported
  and the handler is not run again.
- **Stopping**: the stop event (or SIGTERM/SIGINT when ``run`` installs handlers) stops
  claiming and the running task finishes; a second signal interrupts it and its lease is
  released. A claim in flight returns within its ``waitMs``.
- **A prefetch** (``prefetch=K``): one claim grants up to K leases, each its own (token,
  expiry, heartbeat, ``maxInFlight`` counting each); the tasks run one after another, every
  lease heartbeated from its grant until its outcome is in, and the successes are reported
  in one ``complete_many`` that hands over the next K. Failures and releases are reported
  one by one; a stop gives back the leases not yet run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from autonomy_client.client import Client
from autonomy_client.errors import (
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
from autonomy_client.job import (
    Handler,
    Job,
    JobHandler,
    ReleaseTask,
    ValidationFailed,
    WorkerStats,
    default_worker_name,
)

log = logging.getLogger("autonomy_client.worker")

Outcome = tuple[str, "str | None", "dict[str, Any] | None"]  # (kind, reason, result)
# the lease is gone for good (TaskCancelled: because the task was cancelled)
_LOST = (StaleLease, NotInProgress, TaskNotFound, TaskCancelled)
_LOST_CODES = frozenset(cls.default_code for cls in _LOST)
_FATAL = (AuthError, InvalidInput)  # waiting will not cure these: the worker stops
KEPT_MAX = 256  # outcomes kept for tasks whose lease ran out before they were reported
REASON_MAX_LEN = 2000  # the server's default limit on a failure reason
DEFAULT_BEAT_S = 10.0  # heartbeat period when a lease does not say when it expires
PREFETCH_MAX = 100  # the server's limit on the leases one claim may grant


class Backoff:
    """Doubling waits from ``min_s`` up to ``max_s``; ``reset`` starts again."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s, self.max_s = min_s, max_s
        self._next = min_s

    def step(self) -> float:
        """The next wait."""
        wait, self._next = self._next, min(self.max_s, self._next * 2)
        return wait

    def reset(self) -> None:
        """Back to the shortest wait."""
        self._next = self.min_s


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _storable(text: str) -> str:
    """``text`` without what the server refuses (NUL, lone surrogates)."""
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


class _Heartbeat:
    """One thread extending the leases of ``jobs`` (a prefetch's, or one task's), the one
    due first each time, until each is stopped."""

    def __init__(self, worker: LaneWorker, jobs: list[Job]) -> None:
        self.worker = worker
        now = time.monotonic()
        self._due = {job.task_id: (now + worker._beat_interval(job), job) for job in jobs}
        self._guard = threading.Lock()  # over ``_due``
        self._sending = threading.Lock()  # held while a heartbeat is sent
        self._in_flight: int | None = None  # the task it is sent for
        self._wake = threading.Event()
        self._complained: set[int] = set()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat-{worker.name}-{jobs[0].task_id}")

    def start(self) -> None:
        self._thread.start()

    def stop(self, job: Job | None = None) -> None:
        """Stop beating ``job``'s lease (None: every one); answers once no heartbeat of it
        is in flight. A heartbeat stuck on the network for 5 s is left to time out."""
        with self._guard:
            if job is None:
                self._due.clear()
            else:
                self._due.pop(job.task_id, None)
            last = not self._due
        self._wake.set()
        if (job is None or self._in_flight == job.task_id) \
                and self._sending.acquire(timeout=5):
            self._sending.release()
        if last:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._guard:
                if not self._due:
                    return
                due, job = min(self._due.values(), key=lambda d: d[0])
            if due > time.monotonic():
                self._wake.wait(due - time.monotonic())
                self._wake.clear()
                continue
            with self._sending:
                with self._guard:
                    if job.task_id not in self._due:  # stopped meanwhile
                        continue
                    self._in_flight = job.task_id
                try:
                    self._beat(job)
                finally:
                    self._in_flight = None
            with self._guard:
                if job.task_id in self._due:
                    self._due[job.task_id] = (time.monotonic()
                                              + self.worker._beat_interval(job), job)

    def _beat(self, job: Job) -> None:
        try:
            self.worker._beat_once(job, raise_lost=True)
        except _LOST as e:
            if isinstance(e, TaskCancelled):  # set first: a handler that sees the lease
                job.cancelled.set()           # lost knows why
            job.lease_lost.set()
            with self._guard:
                self._due.pop(job.task_id, None)
            self.worker._log(f"task {job.task_id}: " + (
                "cancelled; stopping its work" if isinstance(e, TaskCancelled)
                else f"heartbeat refused ({e.code}); lease lost"), logging.WARNING)
        except AutonomyError as e:  # transient: keep beating, the lease has slack
            if job.task_id not in self._complained:
                self._complained.add(job.task_id)
                self.worker._log(f"task {job.task_id}: heartbeat failed ({e}); retrying",
                                 logging.WARNING)


class LaneWorker:
    """Claims tasks from ``lane`` through ``client`` and hands each to ``handler``, one at
    a time. Each worker holds one lease per lane, or up to ``prefetch`` (K) with a
    prefetch: run several (each with its own ``worker_name``) for parallelism, and raise
    the lane's ``maxInFlight`` (a lane of N workers with K = 10 needs N x 10 for each to
    hold its K).

    ``wait_ms``: how long a claim on an empty lane waits for work (the client's
    ``wait_ms`` by default). ``heartbeat_interval_s``: a fixed heartbeat period instead of
    a third of what is left of the lease. ``say``: a callable taking each progress line
    instead of ``logging`` (logger ``autonomy_client.worker``).
    """

    def __init__(self, lane: str, handler: Handler, *, client: Client,
                 worker_name: str | None = None, wait_ms: int | None = None,
                 heartbeat_interval_s: float | None = None,
                 idle_backoff_s: tuple[float, float] = (0.1, 2.0),
                 pause_backoff_s: tuple[float, float] = (1.0, 30.0),
                 say: Callable[[str], None] | None = None, prefetch: int = 1) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) \
                or not 1 <= prefetch <= PREFETCH_MAX:
            raise ValueError(f"prefetch must be an integer from 1 to {PREFETCH_MAX}")
        self.lane = lane
        self.prefetch = prefetch
        self.handler = handler
        self.client = client
        self.name = worker_name or default_worker_name()
        self.wait_ms = wait_ms if wait_ms is not None else client.wait_ms
        self.heartbeat_interval_s = heartbeat_interval_s
        self.idle = Backoff(*idle_backoff_s)
        self.pause = Backoff(*pause_backoff_s)
        self.say = say
        self.stats = WorkerStats()
        self._lane_empty = False  # the last claim found nothing: the next one waits
        self._waiting_on: str | None = None  # the error code being waited out, said once
        self._kept: dict[int, Outcome] = {}
        self._next: dict[str, Any] | None = None  # a claim handed over by the last complete
        self._want_next = False
        self._claim_n: int | None = None  # ``max`` of the next claim (a prefetch's)
        self._prefetched: list[Job] = []  # the rest of the last claim's leases

    def _log(self, text: str, level: int = logging.INFO) -> None:
        line = f"worker {self.name} [{self.lane}]: {text}"
        if self.say is not None:
            self.say(line)
        else:
            log.log(level, line)

    # --- the loop -------------------------------------------------------------------

    def run(self, stop_event: threading.Event | None = None, max_tasks: int | None = None,
            *, handle_signals: bool | None = None) -> WorkerStats:
        """Work until ``stop_event`` is set or ``max_tasks`` tasks are finished; answers
        the counts. Without a ``stop_event`` (and in the main thread), SIGTERM/SIGINT stop
        the loop after the running task; a second signal interrupts it."""
        stop = stop_event or threading.Event()
        if handle_signals is None:
            handle_signals = stop_event is None
        with _stop_on_signals(stop, self._log) if handle_signals else _nothing():
            try:
                while not stop.is_set():
                    if max_tasks is not None and self.stats.finished >= max_tasks:
                        break
                    if self.prefetch > 1:
                        self._run_batch(stop, max_tasks)
                        continue
                    job = self.claim_one(stop)
                    if job is not None:
                        self._want_next = max_tasks is None \
                            or self.stats.finished + 1 < max_tasks
                        self.work(job)
            finally:
                self._release_handed_over()
        return self.stats

    def claim_one(self, stop: threading.Event) -> Job | None:
        """One claim; waits out a pause, an outage or an empty lane before answering
        ``None``. Refusals that waiting cannot cure (auth, bad input) are raised."""
        wait_ms = self.wait_ms if self._lane_empty else None
        asked = time.monotonic()
        handed, self._next = self._next, None
        try:
            answer = handed if handed is not None \
                else self.client.claim(self.lane, self.name, wait_ms=wait_ms,
                                       max_n=self._claim_n)
        except LanePaused as e:
            self._wait(stop, e, "waiting for a resume")
            return None
        except _FATAL:
            raise
        except AutonomyError as e:
            self._wait(stop, e, "retrying")
            return None
        if self._waiting_on is not None:
            self._log(f"claiming again (was: {self._waiting_on})")
            self._waiting_on = None
        self.pause.reset()
        task = answer.get("task")
        if task is None and answer.get("guard") is None:  # the lane is empty
            if not self._lane_empty:
                self._lane_empty = True  # the next claim waits for work (push pickup)
            elif time.monotonic() - asked < (wait_ms or 0) / 2000:
                stop.wait(self.idle.step())  # the server did not wait (its cap): poll
            return None
        job = self._job(answer, stop)
        if job is None:  # full with others' leases, or an answer without a usable lease
            stop.wait(self.idle.step())
            return None
        self.idle.reset()
        self._lane_empty = False
        self.stats.claimed += 1
        if self._claim_n is not None:  # a prefetch: the rest of its leases wait their turn
            self._prefetched = self._jobs(answer, stop)[1:]
            self.stats.claimed += len(self._prefetched)
        # ``attempts`` counts failures so far (the server's docs/workers.md), not claims
        failures = int(job.task.get("attempts") or 0)
        self._log(f"task {job.task_id}: claimed ({failures} failure"
                  f"{'' if failures == 1 else 's'} so far)")
        return job

    def _jobs(self, answer: dict[str, Any], stopping: threading.Event) -> list[Job]:
        """Every job a claim's answer grants (``leases`` of a prefetch, else its one)."""
        many = answer.get("leases")
        if isinstance(many, list) and many:
            return [j for j in (self._job(x if isinstance(x, dict) else {}, stopping)
                                for x in many) if j is not None]
        job = self._job(answer, stopping)
        return [] if job is None else [job]

    def _job(self, answer: dict[str, Any], stopping: threading.Event) -> Job | None:
        task, lease = answer.get("task"), answer.get("lease")
        if not isinstance(task, dict) or not isinstance(task.get("id"), int) \
                or not isinstance(lease, dict) or not isinstance(lease.get("token"), str):
            return None
        return Job(task=task, lease_token=lease["token"], lease_expires_at=lease.get("expiresAt"),
                   lane=self.lane, worker=self.name, stopping=stopping)

    def _wait(self, stop: threading.Event, err: AutonomyError, doing: str) -> None:
        if self._waiting_on != err.code:
            self._waiting_on = err.code
            self._log(f"{err.code}: {err.message}; {doing} (backoff up to "
                      f"{self.pause.max_s:g}s)", logging.WARNING)
        stop.wait(self.pause.step())

    def _release_handed_over(self) -> None:
        """Leases handed over or prefetched that will not be worked: give them back."""
        nxt, self._next = self._next, None
        jobs = self._jobs(nxt or {}, threading.Event()) + self._prefetched
        self._prefetched = []
        for job in jobs:
            self._release(job, "the worker is stopping")

    # --- a prefetch: K leases at once ---------------------------------------------------

    def _run_batch(self, stop: threading.Event, max_tasks: int | None) -> None:
        """Claim up to K leases (or take those the last complete handed over), run them in
        turn -- each heartbeated from its grant until its outcome is in -- and report the
        successes in one ``complete_many`` that hands over the next K."""
        self._claim_n = self._batch_size(max_tasks, self.stats.finished)
        self._want_next = False  # a single complete (a fallback) hands nothing over
        first = self.claim_one(stop)
        if first is None:
            return
        jobs, self._prefetched = [first, *self._prefetched], []
        beat = _Heartbeat(self, jobs)  # one thread for all of them
        beat.start()
        done: list[tuple[Job, dict[str, Any] | None]] = []
        ran = 0
        try:
            for job in jobs:
                if stop.is_set():
                    break
                ran += 1
                outcome = self._run_leased(job, beat)
                if outcome is None:
                    continue
                if outcome[0] == "success":
                    done.append((job, outcome[2]))
                else:
                    self._report(job, outcome)
        finally:
            beat.stop()
            for job in jobs[ran:]:  # a stop before their turn: give them back at once
                self._release(job, "the worker is stopping")
            finished = self.stats.finished + len(done)
            more = not stop.is_set() and (max_tasks is None or finished < max_tasks)
            self._complete_batch(done, next_n=self._batch_size(max_tasks, finished)
                                 if more else None)

    def _batch_size(self, max_tasks: int | None, finished: int) -> int:
        """K, or fewer when ``max_tasks`` leaves fewer to do."""
        return self.prefetch if max_tasks is None \
            else max(1, min(self.prefetch, max_tasks - finished))

    def _run_leased(self, job: Job, beat: _Heartbeat) -> Outcome | None:
        """A leased job's outcome, its heartbeats (``beat``, started at its grant) ended
        once it is in; None when there is none to report (its lease was lost while it
        waited its turn or ran). A kept outcome is answered without running it again."""
        kept = self._kept.pop(job.task_id, None)
        if kept is not None:  # it already ran here: report what it answered, never rerun
            beat.stop(job)
            self._log(f"task {job.task_id}: back under this worker's lease; reporting the "
                      "outcome it already has instead of running it again")
            return kept
        if job.lease_lost.is_set():  # a heartbeat was refused while it waited its turn
            beat.stop(job)
            self._count_lost(job, "before its turn; not run")
            return None
        try:
            outcome = self._call_handler(job)
        except BaseException:  # interrupted: give the lease back, then let it propagate
            beat.stop(job)
            self._release(job, "interrupted")
            raise
        beat.stop(job)
        if job.lease_lost.is_set():
            self._count_lost(job, "while working; outcome dropped")
            return None
        return outcome

    def _count_gone(self, job: Job, cancelled: bool, text: str) -> None:
        """A lease gone before its outcome was recorded: counted as cancelled (the task
        was cancelled) or lost (it expired and moved on), and logged."""
        if cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.lost += 1
        self._log(f"task {job.task_id}: {text}", logging.WARNING)

    def _count_lost(self, job: Job, when: str) -> None:
        """A lease its heartbeat found gone (``job.cancelled``: by a cancel) ``when``."""
        cancelled = job.cancelled.is_set()
        self._count_gone(job, cancelled, f"{'cancelled' if cancelled else 'lease lost'} {when}")

    def _complete_batch(self, done: list[tuple[Job, dict[str, Any] | None]], *,
                        next_n: int | None) -> None:
        """The successes in one ``complete_many`` (handing over the next ``next_n``
        leases); each item's refusal is its own. A request refused as a whole is sent
        again one complete at a time, where each outcome is answered in full."""
        if not done:
            return
        items = [(job.task_id, job.lease_token, result) for job, result in done]
        nxt = (self.lane, self.name) if next_n is not None else None
        try:
            answer = self._retrying(lambda: self.client.complete_many(
                items, claim_next=nxt, max_n=next_n), job=done[0][0])
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
                self._log(f"task {job.task_id}: done")
            elif isinstance(res, dict) and res.get("error") in _LOST_CODES:
                self._count_gone(job, res["error"] == TaskCancelled.default_code,
                                 f"outcome refused ({res['error']}): {res.get('message')}")
            else:  # anything else: the one-task path answers it in full
                self._complete(job, "success", None, result)
        if isinstance(answer.get("next"), dict):
            self._next = answer["next"]

    # --- one task ---------------------------------------------------------------------

    def work(self, job: Job) -> None:
        """Run the handler on a claimed task under heartbeats, then report the outcome."""
        if job.stopping.is_set() and job.task_id not in self._kept:
            self._release(job, "stopping before the task started")
            return
        beat = _Heartbeat(self, [job])
        beat.start()
        outcome = self._run_leased(job, beat)
        if outcome is not None:
            self._report(job, outcome)

    def _call_handler(self, job: Job) -> Outcome:
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

    def _report(self, job: Job, outcome: Outcome) -> None:
        kind, reason, result = outcome
        if kind == "release":
            self._release(job, reason or "the handler asked")
        else:
            self._complete(job, kind, reason, result)

    def _complete(self, job: Job, outcome: str, reason: str | None,
                  result: dict[str, Any] | None) -> None:
        if outcome == "failure":
            reason = _storable((reason or "failed").strip()[:REASON_MAX_LEN]) or "failed"
        nxt = (self.lane, self.name) if self._want_next and not job.stopping.is_set() else None
        try:
            answer = self._retrying(lambda: self.client.complete(
                job.task_id, job.lease_token, outcome=outcome, reason=reason, result=result,
                claim_next=nxt), job=job)
        except InvalidInput as e:  # e.g. a result the server refuses: still close the task
            if outcome == "success":
                return self._complete(job, "failure", f"invalid result: {e.message}", None)
            if result is not None:
                return self._complete(job, "failure", reason, None)
            self._log(f"task {job.task_id}: complete refused ({e})", logging.WARNING)
            return self._release(job, "its failure could not be recorded")
        except _LOST as e:  # the lease moved on: the outcome is not ours to record
            self._count_gone(job, isinstance(e, TaskCancelled), f"outcome refused ({e})")
            return None
        except AuthError:
            raise
        except AutonomyError as e:
            self._log(f"task {job.task_id}: complete answered {e}", logging.WARNING)
            if outcome == "success" or result is not None:
                return self._complete(job, "failure", "the server could not record the "
                                      f"outcome ({outcome}): {e.code}", None)
            return self._release(job, f"its outcome could not be recorded ({e.code})")
        if answer is None:  # its lease ran out first: keep it for a claim that brings it back
            self._keep(job, (outcome, reason, result))
            return None
        if isinstance(answer.get("next"), dict):
            self._next = answer["next"]
        if outcome == "success":
            self.stats.succeeded += 1
            self._log(f"task {job.task_id}: done")
            return None
        self.stats.failed += 1
        line = (f"task {job.task_id}: failed ({reason}); fingerprint "
                f"{answer.get('failureFingerprint')} x{answer.get('fingerprintCount')}")
        if answer.get("lanePaused"):
            line += "; the lane is paused by the breaker"
        self._log(line)
        return None

    def _release(self, job: Job, why: str) -> None:
        try:
            answer = self._retrying(lambda: self.client.release(job.task_id, job.lease_token))
        except AutonomyError as e:  # nothing more to do: the lease expires on its own
            self._log(f"task {job.task_id}: release refused ({e})", logging.WARNING)
            return
        if answer is not None:
            self.stats.released += 1
            self._log(f"task {job.task_id}: lease released ({why})")

    def _keep(self, job: Job, outcome: Outcome) -> None:
        self._kept[job.task_id] = outcome
        while len(self._kept) > KEPT_MAX:
            del self._kept[next(iter(self._kept))]
        self.stats.kept += 1
        self._log(f"task {job.task_id}: outcome kept ({outcome[0]}); reported, not run "
                  "again, if the task comes back to this worker", logging.WARNING)

    def _retrying(self, fn: Callable[[], dict[str, Any]], *, for_s: float = 30.0,
                  job: Job | None = None) -> dict[str, Any] | None:
        """``fn()`` retried while the API is unavailable; None when it gave up. With a
        ``job``: until its lease runs out, heartbeating between tries when the API
        answers; without: for ``for_s`` (then the lease expires and the task is requeued
        server-side, so giving up loses nothing)."""
        backoff = Backoff(0.2, 5.0)
        start = last_beat = time.monotonic()
        while True:
            try:
                return fn()
            except Unavailable as e:
                why = e.message
            now = time.monotonic()
            left = self._lease_left_s(job) if job is not None and job.lease_expires_at \
                else for_s - (now - start)
            if left <= 0:
                self._log(f"giving up after {now - start:.1f}s: {why}", logging.WARNING)
                return None
            if job is not None and now - last_beat >= self._beat_interval(job):
                last_beat = now
                # down or refused: the complete's own answer will say which
                with contextlib.suppress(AutonomyError):
                    self._beat_once(job, raise_lost=False)
            time.sleep(min(backoff.step(), left))

    # --- leases -----------------------------------------------------------------------

    def _lease_left_s(self, job: Job) -> float:
        if not job.lease_expires_at:
            return 0.0
        try:
            return (_parse_time(job.lease_expires_at) - _utcnow()).total_seconds()
        except ValueError:
            return 0.0

    def _beat_interval(self, job: Job) -> float:
        """Fixed, or a third of what is left of the lease (at least 50 ms)."""
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        left = self._lease_left_s(job)
        return max(0.05, left / 3) if left > 0 else DEFAULT_BEAT_S

    def _beat_once(self, job: Job, *, raise_lost: bool) -> None:
        try:
            answer = self.client.heartbeat(job.task_id, job.lease_token)
        except _LOST:
            if raise_lost:
                raise
            return
        job.heartbeats += 1
        lease = answer.get("lease")
        if isinstance(lease, dict) and isinstance(lease.get("expiresAt"), str):
            job.lease_expires_at = lease["expiresAt"]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _stop_on_signals(stop: threading.Event, say: Callable[[str], None]) -> Iterator[None]:
    """First SIGTERM/SIGINT: stop claiming. Second: interrupt (the lease is released)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say(f"{signal.Signals(signum).name}: stopping after the running task "
            "(send it again to interrupt)")

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
