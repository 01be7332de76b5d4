"""The periodic check jobs as Celery tasks (scheduled by ``beat_schedule.JOBS``).

Each task runs one job under its run-lock through ``app.ops.checks.jobs.run_job`` and returns
its JSON answer -- the stored result Flower shows. A refusal of the domain (an
``AutonomyError``) is an answer, ``{"ok": false, "error": code, "message": ...}``, not a
traceback; an unreachable Redis or database raises, so Celery records a failure and the
operator sees a red task.
"""

from __future__ import annotations

from typing import Any

from celery import Task

import beat_schedule
from app.celery_app import app, worker_context
from app.errors import AutonomyError, Unavailable


def _run(task: Task, job: str) -> dict[str, Any]:
    from app.ops.checks.jobs import run_job
    from app.ops.run_locks import holder_name as default_holder

    try:
        return run_job(worker_context(), job, holder=default_holder(task.request.id))
    except Unavailable:
        raise
    except AutonomyError as e:
        return {**e.to_wire(), "job": job}


def _register(job: str, name: str) -> Task:
    def run(self: Task) -> dict[str, Any]:
        return _run(self, job)

    run.__name__ = run.__qualname__ = job
    run.__doc__ = f"Run the ``{job}`` check under its run-lock."
    return app.task(bind=True, name=name)(run)


# one task per job, named as beat_schedule.JOBS names it: tasks.checks.handoff_health, ...
TASKS: dict[str, Task] = {job: _register(job, str(spec["task"]))
                          for job, spec in beat_schedule.JOBS.items()}
