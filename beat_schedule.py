"""The periodic jobs: data only. ``app.celery_app`` turns it into Celery's beat schedule,
``app.ops.checks.jobs`` takes each job's run-lock budget from it.

- ``task``: the Celery task (in ``tasks/checks.py``) that runs the job.
- ``every_s``: how often beat sends it (``AUTONOMY_BEAT_EVERY_S`` overrides all of them).
- ``budget_ms``: how long one run may take; the run-lock lives budget + grace, and a run
  still going past its budget is reported ``overBudget`` (never broken while it beats).
"""

JOBS: dict[str, dict[str, str | float | int]] = {
    "handoff_health": {"task": "tasks.checks.handoff_health", "every_s": 60.0, "budget_ms": 30_000},
    "readiness": {"task": "tasks.checks.readiness", "every_s": 60.0, "budget_ms": 30_000},
    "self_heal": {"task": "tasks.checks.self_heal", "every_s": 30.0, "budget_ms": 60_000},
    "status": {"task": "tasks.checks.status", "every_s": 15.0, "budget_ms": 15_000},
    "retention": {"task": "tasks.checks.retention", "every_s": 600.0, "budget_ms": 60_000},
}
