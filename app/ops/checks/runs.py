"""Each periodic job's schedule and its last run, as recorded by ``jobs.run_job``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

import beat_schedule
from app.clock import iso_ms, to_ms
from app.ops.checks import job_stats, state
from app.storage.context import Context

JOB_NAMES: tuple[str, ...] = tuple(beat_schedule.JOBS)


def every_s(ctx: Context, job: str) -> float:
    """How often beat sends ``job`` (the override setting wins)."""
    return float(ctx.settings.beat_every_s or beat_schedule.JOBS[job]["every_s"])


def budget_ms(job: str) -> int:
    return int(beat_schedule.JOBS[job]["budget_ms"])


def load_states(conn: Connection, *, now: datetime) -> state.States:
    """Every check state -- handoff, ops incident, readiness, self-heal, each job's last
    run and run statistics -- in one query."""
    names = [state.HANDOFF, state.OPS_INCIDENT, state.READINESS, state.SELF_HEAL,
             *(state.job_state_name(j) for j in JOB_NAMES),
             *(job_stats.stats_state_name(j) for j in JOB_NAMES)]
    return state.load(conn, names=names, now=now)


def job_views(states: state.States, ctx: Context) -> dict[str, dict[str, Any]]:
    """Each periodic job's last run as the status payload shows it (``missed`` when its
    last start is older than ``job_missed_after_factor`` periods), with its run statistics
    (``job_stats.view``: runs, failures, last success, duration histogram)."""
    now = states.now
    out = {}
    for job in JOB_NAMES:
        period = every_s(ctx, job)
        r = states.get(state.job_state_name(job), _job_shape)
        view: dict[str, Any] = {"schedule": f"every {period:g}s", "everyS": period,
                                "budgetMs": budget_ms(job), "lastStartedAt": None,
                                "lastRunAt": None, "durationMs": None, "ok": None,
                                "error": None, "skipped": None, "missed": False,
                                "stateError": None if r.error == "missing" else r.error,
                                **job_stats.view(states, job)}
        d = r.data
        if d is not None:
            started_ms = d.get("lastStartedAt")
            view.update(lastStartedAt=iso_ms(started_ms), lastRunAt=iso_ms(d.get("lastRunAt")),
                        durationMs=d.get("durationMs"), ok=d.get("ok"), error=d.get("error"),
                        message=d.get("message"))
            skipped_ms = d.get("skippedAt")
            if d.get("skipped") and (started_ms is None or (skipped_ms or 0) >= started_ms):
                view["skipped"] = d["skipped"]
            if isinstance(started_ms, int):
                late_s = (to_ms(now) - started_ms) / 1000
                view["missed"] = late_s > period * ctx.settings.job_missed_after_factor
        out[job] = view
    return out


def _job_shape(d: Any) -> str | None:
    for key in ("lastStartedAt", "lastRunAt", "skippedAt"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            return f"{key} must be epoch milliseconds"
    if "ok" in d and d["ok"] is not None and not isinstance(d["ok"], bool):
        return "ok must be a boolean"
    return None



