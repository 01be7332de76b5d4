"""The periodic check jobs as Celery tasks (scheduled by ``beat_schedule.JOBS``).

Each task runs one job under its run-lock through ``app.checks.jobs.run_job`` and returns
its JSON answer -- the stored result Flower shows. A refusal of the domain (an
``AutonomyError``) is an answer, ``{"ok": false, "error": code, "message": ...}``, not a
traceback; an unreachable Redis or database raises, so Celery records a failure and the
operator sees a red task.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from app.celery_app import app, worker_context
from app.errors import AutonomyError, Unavailable


def _run(task: Task, job: str) -> dict[str, Any]:
    from app.checks.jobs import run_job
    from app.locks import default_holder

    try:
        return run_job(worker_context(), job, holder=default_holder(task.request.id))
    except Unavailable:
        raise
    except AutonomyError as e:
        return {**e.to_wire(), "job": job}


@app.task(bind=True, name="tasks.checks.handoff_health")
def handoff_health(self: Task) -> dict[str, Any]:
    """Handoff health: GO/NO_GO from the cron, queue and ops criteria."""
    return _run(self, "handoff_health")


@app.task(bind=True, name="tasks.checks.readiness")
def readiness(self: Task) -> dict[str, Any]:
    """Autonomy readiness: sustained backlog stall and sustained ops failure."""
    return _run(self, "readiness")


@app.task(bind=True, name="tasks.checks.self_heal")
def self_heal(self: Task) -> dict[str, Any]:
    """Self-heal: requeue expired leases, break run-locks whose holder is gone."""
    return _run(self, "self_heal")


@app.task(bind=True, name="tasks.checks.status")
def status(self: Task) -> dict[str, Any]:
    """The status payload (``workflowHealth.runLocks`` included)."""
    return _run(self, "status")
