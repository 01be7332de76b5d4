"""Each periodic job's run statistics: how many runs, how many failed, when it last
succeeded, and a histogram of run durations -- kept in the database, so that the process
that exports them (the API's ``/metrics``) need not be the one that ran the job.

One ``check_state`` row per job, ``job_stats:{job}``, written in the same transaction as
the job's run record by ``jobs.run_job`` (which holds the job's run-lock, so two runs never
step the same row at once). It is a row of its own, not fields of ``job:{job}``: a run that
is skipped (``already_running``) rewrites ``job:{job}`` while the holder may be finishing,
and it must not be able to drop an observation.

Counts only grow; a row that cannot be read, or whose bucket bounds are not the current
ones, starts again from zero -- to Prometheus that is a counter reset, which it handles.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from app.clock import iso_ms, to_ms
from app.ops.checks import state

# upper bounds (seconds) of the duration buckets; the last bucket (+Inf) is implied. Check
# jobs take milliseconds to seconds; budgets run to a minute.
BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                10.0, 30.0, 60.0, 120.0, 300.0)


def stats_state_name(job: str) -> str:
    return f"job_stats:{job}"


def _empty() -> dict[str, Any]:
    return {"bucketsS": list(BUCKETS_S), "counts": [0] * (len(BUCKETS_S) + 1), "sumMs": 0,
            "runs": 0, "failures": 0, "lastSuccessAt": None}


def _shape(d: Any) -> str | None:
    if d.get("bucketsS") != list(BUCKETS_S):
        return "bucketsS are not the current bucket bounds"
    counts = d.get("counts")
    if (not isinstance(counts, list) or len(counts) != len(BUCKETS_S) + 1
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)):
        return "counts must be one non-negative integer per bucket"
    for key in ("sumMs", "runs", "failures"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"{key} must be a non-negative integer"
    v = d.get("lastSuccessAt")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        return "lastSuccessAt must be epoch milliseconds"
    return None


def record(conn: Connection, *, job: str, duration_ms: int, ok: bool, now: datetime) -> None:
    """Add one run of ``job`` (in the caller's transaction)."""
    name = stats_state_name(job)
    prev = state.read(conn, name=name, now=now, shape=_shape)
    d = prev.data if prev.data is not None else _empty()
    seconds = duration_ms / 1000
    i = next((i for i, le in enumerate(BUCKETS_S) if seconds <= le), len(BUCKETS_S))
    d["counts"][i] += 1
    d["sumMs"] += max(0, duration_ms)
    d["runs"] += 1
    if ok:
        d["lastSuccessAt"] = to_ms(now)
    else:
        d["failures"] += 1
    state.write(conn, name=name, data=d, now=now)


def view(states: state.States, job: str) -> dict[str, Any]:
    """The job's statistics for the status payload: ``runs``, ``failures``,
    ``lastSuccessAt`` and ``durationHistogram`` (bucket upper bounds in seconds and
    cumulative counts, the last one +Inf, as Prometheus histograms count)."""
    r = states.get(stats_state_name(job), _shape)
    d = r.data if r.data is not None else _empty()
    cumulative, total = [], 0
    for c in d["counts"]:
        total += c
        cumulative.append(total)
    return {"runs": d["runs"], "failures": d["failures"],
            "lastSuccessAt": iso_ms(d["lastSuccessAt"]),
            "durationHistogram": {"bucketsS": list(BUCKETS_S), "cumulativeCounts": cumulative,
                                  "sumS": d["sumMs"] / 1000, "count": total},
            "statsError": None if r.error in (None, "missing") else r.error}
