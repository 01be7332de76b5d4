"""Run a periodic job under its run-lock, and remember how each run went.

``run_job(ctx, "readiness")`` is what the Celery task, ``autonomy check`` and the tests all
call: it takes the job's run-lock (budget from ``beat_schedule.JOBS``), runs the check while
the lock's heartbeat beats, and records the run (``job:{name}`` state: when it started and
finished, whether it raised; ``job_stats:{name}``: counts and a duration histogram for
``/metrics``) -- the handoff check's ``cron`` criterion reads those records.
A run that finds the lock held does nothing but answer ``skipped: "already_running"`` with
the holder and elapsed time (and leave an event saying so) -- except self-heal finding its
own lock held by a dead holder: it breaks that lock, as it would any dead holder's, and runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from app.clock import to_ms
from app.errors import AutonomyError, InvalidInput
from app.ops import retention
from app.ops.checks import handoff, job_stats, readiness, runs, selfheal, state, status
from app.storage import locks, store
from app.storage.context import Context
from app.storage.db import transaction

CHECKS: dict[str, Callable[[Context, state.Fence], dict[str, Any]]] = {
    "handoff_health": handoff.run_handoff,
    "readiness": readiness.run_readiness,
    "self_heal": selfheal.run_self_heal,
    "status": lambda ctx, _fence: status.build_status(ctx),  # writes nothing
    "retention": retention.run_retention,
}
assert set(runs.JOB_NAMES) == set(CHECKS), "beat_schedule.JOBS and CHECKS name the same jobs"
JOB_NAMES = runs.JOB_NAMES


def run_job(ctx: Context, job: str, *, holder: str | None = None) -> dict[str, Any]:
    """Run ``job`` once under its run-lock; answers its result with ``job`` and
    ``durationMs``, or ``skipped: "already_running"`` when another run holds the lock.

    Raises ``InvalidInput`` for an unknown job; an error inside the check is recorded as
    the run's outcome and raised again.
    """
    if job not in CHECKS:
        raise InvalidInput(f"unknown job {job!r}: one of {', '.join(JOB_NAMES)}", field="job")
    for attempt in (1, 2):
        try:
            with locks.held(ctx, job, budget_ms=runs.budget_ms(job), holder=holder) as h:
                return _run(ctx, job, h)
        except locks.AlreadyRunning as e:
            # self-heal is what breaks a dead holder's lock: its own too, or a self-heal
            # killed mid-run would hold every next run off until its lock's TTL
            if attempt == 1 and job == "self_heal" and selfheal.break_own_dead_lock(ctx):
                continue
            _record_skip(ctx, job, e)
            return {"ok": True, "job": job, "skipped": "already_running", "holder": e.holder,
                    "elapsedMs": e.elapsed_ms}
    raise AssertionError("unreachable")


def _run(ctx: Context, job: str, h: locks.Held) -> dict[str, Any]:
    started, t0 = ctx.db_now(), time.monotonic()
    fence = state.Fence(ctx, h)
    try:
        try:
            result = CHECKS[job](ctx, fence)
        except locks.RunLockLost:
            raise
        except Exception as e:
            _record_run(ctx, job, fence, started=started, t0=t0, ok=False,
                        error=e.code if isinstance(e, AutonomyError) else type(e).__name__,
                        message=str(e)[:500], holder=h.holder)
            raise
        _hold_for_min_runtime(ctx, job, t0)
        duration = _record_run(ctx, job, fence, started=started, t0=t0, ok=True, error=None,
                               message=None, holder=h.holder)
    except locks.RunLockLost as e:
        _record_fenced(ctx, e, holder=h.holder)
        raise
    return {**result, "job": job, "durationMs": duration, "lockLost": h.lost}


def _hold_for_min_runtime(ctx: Context, job: str, t0: float) -> None:
    # a demo/test knob: keep the run (and its lock, beating) going a while so that "a job
    # still running" can be watched in the status payload, Flower and the panel
    min_ms = ctx.settings.job_min_runtime_ms.get(job, 0)
    left_s = min_ms / 1000 - (time.monotonic() - t0)
    if left_s > 0:
        time.sleep(left_s)


def _record_run(ctx: Context, job: str, fence: state.Fence, *, started: datetime, t0: float,
                ok: bool, error: str | None, message: str | None, holder: str) -> int:
    duration = int((time.monotonic() - t0) * 1000)
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        fence.check("the run's record")
        state.write(conn, name=state.job_state_name(job), now=now, data={
            "lastStartedAt": to_ms(started), "lastRunAt": to_ms(now), "durationMs": duration,
            "ok": ok, "error": error, "message": message, "holder": holder})
        job_stats.record(conn, job=job, duration_ms=duration, ok=ok, now=now)
    return duration


def _record_fenced(ctx: Context, e: locks.RunLockLost, *, holder: str) -> None:
    """The refused write is an event (SPEC 4.7): which job, which holder, what."""
    with transaction(ctx.engine) as conn:
        store.insert_event(conn, kind="run_lock_fenced", at=ctx.clock(), actor=e.job,
                           reason=e.code, data={"job": e.job, "holder": holder,
                                                "refused": e.what})


def _record_skip(ctx: Context, job: str, e: locks.AlreadyRunning) -> None:
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        prev = state.read(conn, name=state.job_state_name(job), now=now)
        data = dict(prev.data or {})
        data.update(skipped="already_running", skippedAt=to_ms(now))
        state.write(conn, name=state.job_state_name(job), data=data, now=now)
        store.insert_event(conn, kind="run_lock_skipped", at=now, actor=job,
                           reason="already_running",
                           data={"job": job, "holder": e.holder, "elapsedMs": e.elapsed_ms})
