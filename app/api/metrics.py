"""``GET /metrics``: the status payload in the Prometheus text format.

Built per scrape from one status payload (a collector over a fresh registry), so the
figures are the ones the control panel shows, and nothing is kept in this process between
scrapes: what must outlive a process (each job's run count, failures, last success and
duration histogram) is persisted with the job's run record (``app.ops.checks.job_stats``).

Conventions (the Prometheus naming guide; ``tests/test_metrics.py`` checks them on a real
scrape): every name starts ``autonomy_``; counters end ``_total``; no gauge ends
``_count``/``_sum``/``_bucket``/``_total``; times are ``_seconds`` (timestamps
``_timestamp_seconds``); ``autonomy_build_info`` is the one ``_info`` gauge (always 1).
Labels are bounded: ``lane``, ``job_name``, ``status``, ``state``, ``criterion``,
``guard``, ``le`` and the build labels -- never a free-text reason or a failure fingerprint
(each lane's breaker window is summarised instead). Not ``job`` or ``instance``: Prometheus
sets those on every scraped series itself (ours would be renamed ``exported_job``). A
family is only emitted when it has samples, so none is always empty. "Unknown" is a state
of its own: a handoff or readiness verdict that was never computed (or cannot be read) is
``state="unknown"``, never ``NO_GO``.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LIVE_STATUSES = ("todo", "in_progress")
INCIDENT_STATUSES = ("ok", "warning", "critical", "recovering")
VERDICTS = ("GO", "NO_GO", "unknown")
KNOWN_GUARDS = ("duplicate_claim_guard", "duplicate_complete_guard", "duplicate_create_guard")


class StatusCollector(Collector):
    """Metric families from one status payload (it carries ``redis`` and ``beat``)."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        yield from (f for f in self.all_families() if f.samples)

    def all_families(self) -> list[Metric]:
        """Every family, the empty ones too (``collect`` leaves those out)."""
        s = self.status
        wh = _dict(s.get("workflowHealth"))
        jobs = _dict(wh.get("jobs"))
        lanes = _list(s.get("lanes"))
        return [
            _build_info(),
            *_run_locks(_list(wh.get("runLocks")), jobs),
            *_jobs(jobs),
            *_lanes(lanes),
            *_breaker(lanes, _list(s.get("fingerprints"))),
            *_verdict("handoff", _dict(s.get("handoff"))),
            *_verdict("readiness", _dict(s.get("readiness"))),
            *_criteria(_dict(_dict(s.get("handoff")).get("criteria"))),
            *_incident(_dict(s.get("opsIncident"))),
            *_counters(_dict(s.get("metrics"))),
            *_infrastructure(s),
            *_clock_skew(s),
            *_retention(_dict(s.get("retention"))),
        ]


def render(status: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition of a status payload."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry)


def _dict(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> list[Any]:
    return [x for x in v if isinstance(x, Mapping)] if isinstance(v, list) else []


def _num(v: Any) -> float:
    # counters read from a Redis hash may arrive as strings
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return 0.0
    try:
        return float(v)
    except ValueError:
        return 0.0


def _epoch_s(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def _build_info() -> Metric:
    g = _gauge("autonomy_build_info", "Always 1: the running version.", ["version", "python"])
    g.add_metric([__version__, platform.python_version()], 1.0)
    return g


def _run_locks(locks: list[Mapping[str, Any]], jobs: Mapping[str, Any]) -> list[Metric]:
    held_total = _gauge("autonomy_run_locks_held", "Run-locks currently held.")
    held_total.add_metric([], len(locks))
    over_total = _gauge("autonomy_run_locks_over_budget", "Held run-locks past their budget.")
    over_total.add_metric([], sum(1 for lk in locks if lk.get("overBudget")))
    held = _gauge("autonomy_run_lock_held", "1 while the job's run-lock is held.", ["job_name"])
    over = _gauge("autonomy_run_lock_over_budget",
                  "1 while the job's run-lock is held past its budget.", ["job_name"])
    elapsed = _gauge("autonomy_run_lock_elapsed_seconds",
                     "How long each held run-lock has been held.", ["job_name"])
    budget = _gauge("autonomy_run_lock_budget_seconds", "Each job's run-lock time budget.",
                    ["job_name"])
    by_job = {str(lk.get("job")): lk for lk in locks}
    budgets = {str(j): _num(_dict(v).get("budgetMs")) for j, v in jobs.items()}
    for job in sorted(set(budgets) | set(by_job)):
        lk = by_job.get(job)
        held.add_metric([job], 1.0 if lk else 0.0)
        over.add_metric([job], 1.0 if lk and lk.get("overBudget") else 0.0)
        if lk:
            elapsed.add_metric([job], _num(lk.get("elapsedMs")) / 1000)
        ms = _num(lk.get("budgetMs")) if lk else budgets[job]
        budget.add_metric([job], ms / 1000)
    return [held_total, over_total, held, over, elapsed, budget]


def _jobs(jobs: Mapping[str, Any]) -> list[Metric]:
    duration = HistogramMetricFamily("autonomy_job_duration_seconds",
                                     "Run time of each periodic job's runs.", labels=["job_name"])
    failures = CounterMetricFamily("autonomy_job_failures",
                                   "Runs of each periodic job that raised.", labels=["job_name"])
    last_ok = _gauge("autonomy_job_last_success_timestamp_seconds",
                     "When each periodic job last finished a run without error.", ["job_name"])
    missed = _gauge("autonomy_job_missed",
                    "1 when the job's last start is several periods old.", ["job_name"])
    for job, view in sorted(jobs.items()):
        v, job = _dict(view), str(job)
        h = _dict(v.get("durationHistogram"))
        bounds, cumulative = h.get("bucketsS"), h.get("cumulativeCounts")
        if isinstance(bounds, list) and isinstance(cumulative, list) \
                and len(cumulative) == len(bounds) + 1:
            les = [floatToGoString(b) for b in bounds] + ["+Inf"]
            duration.add_metric([job], list(zip(les, map(_num, cumulative), strict=True)),
                                _num(h.get("sumS")))
        if "failures" in v:
            failures.add_metric([job], _num(v.get("failures")))
        ts = _epoch_s(v.get("lastSuccessAt"))
        if ts is not None:
            last_ok.add_metric([job], ts)
        missed.add_metric([job], 1.0 if v.get("missed") else 0.0)
    return [duration, failures, last_ok, missed]


def _lanes(lanes: list[Mapping[str, Any]]) -> list[Metric]:
    total = _gauge("autonomy_lanes_paused", "Lanes paused.")
    total.add_metric([], sum(1 for ln in lanes if ln.get("paused")))
    paused = _gauge("autonomy_lane_paused", "1 when the lane is paused.", ["lane"])
    tasks = _gauge("autonomy_lane_tasks", "Live tasks per lane and status.", ["lane", "status"])
    dead = _gauge("autonomy_lane_dead_tasks", "Tasks that failed their lane's max attempts "
                  "and wait for a requeue.", ["lane"])
    for ln in lanes:
        a = str(ln.get("assignee"))
        paused.add_metric([a], 1.0 if ln.get("paused") else 0.0)
        counts = _dict(ln.get("counts"))
        for st in LIVE_STATUSES:
            tasks.add_metric([a, st], _num(counts.get(st)))
        dead.add_metric([a], _num(counts.get("dead")))
    return [total, paused, tasks, dead]


def _breaker(lanes: list[Mapping[str, Any]], fps: list[Mapping[str, Any]]) -> list[Metric]:
    """Each lane's breaker window (since its last resume, when that is later: the counts
    the breaker uses), summarised: the fingerprints themselves are free text (unbounded)
    and stay in the status payload and the panel."""
    failures = _gauge("autonomy_breaker_window_failures",
                      "Validation failures in the lane's breaker window.", ["lane"])
    distinct = _gauge("autonomy_breaker_window_fingerprints",
                      "Distinct failure fingerprints in the lane's breaker window.", ["lane"])
    top = _gauge("autonomy_breaker_top_fingerprint_failures",
                 "Failures of the lane's most frequent fingerprint in the breaker window "
                 "(the breaker pauses the lane when it reaches the threshold).", ["lane"])
    threshold = _gauge("autonomy_breaker_threshold",
                       "Failures of one fingerprint that pause a lane.")
    per_lane: dict[str, list[float]] = {str(ln.get("assignee")): [] for ln in lanes}
    for fp in fps:
        per_lane.setdefault(str(fp.get("assignee")), []).append(_num(fp.get("count")))
    for lane, counts in sorted(per_lane.items()):
        failures.add_metric([lane], sum(counts))
        # a fingerprint seen only before the lane's resume is out of the breaker's window
        distinct.add_metric([lane], sum(1 for c in counts if c))
        top.add_metric([lane], max(counts, default=0.0))
    if fps:
        threshold.add_metric([], _num(fps[0].get("threshold")))
    return [failures, distinct, top, threshold]


def _verdict(name: str, signal: Mapping[str, Any]) -> list[Metric]:
    st = signal.get("state")
    verdict = st if st in ("GO", "NO_GO") and not signal.get("error") else "unknown"
    g = _gauge(f"autonomy_{name}_state",
               f"1 for the {name} verdict in force: GO, NO_GO, or unknown (never computed, "
               "or unreadable).", ["state"])
    for v in VERDICTS:
        g.add_metric([v], 1.0 if verdict == v else 0.0)
    stale = _gauge(f"autonomy_{name}_stale", f"1 when the {name} snapshot is stale.")
    stale.add_metric([], 1.0 if signal.get("stale") else 0.0)
    return [g, stale]


def _criteria(criteria: Mapping[str, Any]) -> list[Metric]:
    fails = _gauge("autonomy_handoff_criterion_consecutive_failures",
                   "Consecutive failing runs per handoff criterion.", ["criterion"])
    no_go = _gauge("autonomy_handoff_criterion_no_go",
                   "1 when the criterion holds the handoff NO_GO.", ["criterion"])
    for name, c in sorted(criteria.items()):
        c = _dict(c)
        fails.add_metric([str(name)], _num(c.get("consecutiveFailures")))
        no_go.add_metric([str(name)], 1.0 if c.get("noGo") else 0.0)
    return [fails, no_go]


def _incident(inc: Mapping[str, Any]) -> list[Metric]:
    g = _gauge("autonomy_ops_incident_status", "1 for the ops incident's current status.",
               ["status"])
    for st in INCIDENT_STATUSES:
        g.add_metric([st], 1.0 if inc.get("status") == st else 0.0)
    stale = _gauge("autonomy_ops_incident_stale",
                   "1 when a critical/warning incident is old enough to read as recovering.")
    stale.add_metric([], 1.0 if inc.get("stale") else 0.0)
    return [g, stale]


def _counters(metrics: Mapping[str, Any]) -> list[Metric]:
    claims = CounterMetricFamily("autonomy_claims", "Leases granted by claims.")
    claims.add_metric([], _num(metrics.get("claims")))
    guards = CounterMetricFamily("autonomy_guard_hits", "Duplicates refused, per guard.",
                                 labels=["guard"])
    names = set(KNOWN_GUARDS) | {k[6:] for k in metrics if k.startswith("guard:")}
    for g in sorted(names):
        guards.add_metric([g], _num(metrics.get(f"guard:{g}")))
    redacted = CounterMetricFamily("autonomy_secrets_redacted",
                                   "Secrets taken out of failure reasons and results before "
                                   "they were stored.")
    redacted.add_metric([], _num(metrics.get("secrets_redacted")))
    return [claims, guards, redacted]


def _retention(r: Mapping[str, Any]) -> list[Metric]:
    """What the retention job pruned since the store began (SPEC 4.11)."""
    totals = _dict(r.get("prunedTotal"))
    out: list[Metric] = []
    for kind, what in (("tasks", "Finished tasks"), ("events", "Events of pruned tasks"),
                       ("fingerprints", "Failure fingerprint rows")):
        pruned = CounterMetricFamily(f"autonomy_retention_pruned_{kind}",
                                     f"{what} pruned by retention.")
        pruned.add_metric([], _num(totals.get(kind)))
        out.append(pruned)
    return out


def _clock_skew(s: Mapping[str, Any]) -> list[Metric]:
    """SPEC 4.9: the workers' reported clock skew, summarised (a worker's name is not a
    bounded label; status lists them one by one)."""
    skew = _dict(s.get("clockSkew"))
    worst = _gauge("autonomy_worker_clock_skew_max_seconds",
                   "The largest clock skew (either way) a worker reported in the last hour "
                   "(0 while none reports).")
    skewed = _gauge("autonomy_workers_clock_skewed",
                    "Workers whose reported clock skew is past clock_skew_warn_s.")
    reporting = _gauge("autonomy_workers_clock_reporting",
                       "Workers that reported their clock skew in the last hour.")
    if "reporting" in skew:
        reporting.add_metric([], _num(skew.get("reporting")))
        skewed.add_metric([], _num(skew.get("skewed")))
        # no worker reporting: no skew known, 0 (the gauge is never missing while Redis
        # answers)
        worst.add_metric([], _num(skew.get("maxAbsMs") or 0) / 1000)
    return [worst, skewed, reporting]


def _infrastructure(s: Mapping[str, Any]) -> list[Metric]:
    redis = _gauge("autonomy_redis_degraded",
                   "1 when Redis is degraded (the database carries on alone).")
    if s.get("redis") in ("ok", "degraded"):
        redis.add_metric([], 1.0 if s["redis"] == "degraded" else 0.0)
    evicts = _gauge("autonomy_redis_evicts_fleet_keys",
                    "1 when Redis's maxmemory-policy may evict run-locks and leases "
                    "(allkeys-*): a misconfiguration.", ["policy"])
    memory = s.get("redisMemory")
    if isinstance(memory, Mapping) and memory.get("maxmemoryPolicy"):
        evicts.add_metric([str(memory["maxmemoryPolicy"])],
                          1.0 if memory.get("evictsFleetKeys") else 0.0)
    beat = s.get("beat")
    present = _gauge("autonomy_beat_leader_present", "1 when a beat leads (holds the lease).")
    standbys = _gauge("autonomy_beat_standbys", "Beats standing by to take over.")
    if isinstance(beat, Mapping):
        present.add_metric([], 1.0 if beat.get("leader") else 0.0)
        if isinstance(beat.get("standbys"), list):
            standbys.add_metric([], len(beat["standbys"]))
    return [redis, evicts, present, standbys]
