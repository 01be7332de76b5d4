"""``GET /metrics``: the status payload in the Prometheus text format.

Built per scrape from one ``build_status`` payload (a collector over a fresh registry), so
the figures are the ones the control panel shows, and nothing is kept between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LIVE_STATUSES = ("todo", "in_progress")
INCIDENT_STATUSES = ("ok", "warning", "critical", "recovering")


class StatusCollector(Collector):
    """Metric families from one status payload."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status
        degraded = GaugeMetricFamily("autonomy_redis_degraded",
                                     "1 while Redis is down or stalled (the database answers "
                                     "alone).")
        degraded.add_metric([], 1.0 if s.get("redis") == "degraded" else 0.0)
        yield degraded
        yield from _run_locks(_dict(s.get("workflowHealth")))
        yield from _lanes(_list(s.get("lanes")))
        yield from _go("handoff", _dict(s.get("handoff")))
        yield from _go("readiness", _dict(s.get("readiness")))
        yield from _criteria(_dict(_dict(s.get("handoff")).get("criteria")))
        yield from _incident(_dict(s.get("opsIncident")))
        yield from _counters(_dict(s.get("metrics")))
        yield from _fingerprints(_list(s.get("fingerprints")))


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


def _run_locks(wh: Mapping[str, Any]) -> Iterator[Metric]:
    locks = _list(wh.get("runLocks"))
    yield GaugeMetricFamily("autonomy_run_locks_held", "Run-locks currently held.",
                            value=len(locks))
    yield GaugeMetricFamily("autonomy_run_locks_over_budget",
                            "Held run-locks past their time budget.",
                            value=sum(1 for lk in locks if lk.get("overBudget")))
    elapsed = GaugeMetricFamily("autonomy_run_lock_elapsed_seconds",
                                "How long each held run-lock has been held.", labels=["job"])
    budget = GaugeMetricFamily("autonomy_run_lock_budget_seconds",
                               "Each held run-lock's time budget.", labels=["job"])
    for lk in locks:
        job = str(lk.get("job"))
        elapsed.add_metric([job], _num(lk.get("elapsedMs")) / 1000)
        budget.add_metric([job], _num(lk.get("budgetMs")) / 1000)
    yield elapsed
    yield budget


def _lanes(lanes: list[Mapping[str, Any]]) -> Iterator[Metric]:
    yield GaugeMetricFamily("autonomy_lanes_paused", "Lanes paused.",
                            value=sum(1 for ln in lanes if ln.get("paused")))
    paused = GaugeMetricFamily("autonomy_lane_paused", "1 when the lane is paused.",
                               labels=["assignee"])
    tasks = GaugeMetricFamily("autonomy_lane_tasks", "Live tasks per lane and status.",
                              labels=["assignee", "status"])
    for ln in lanes:
        a = str(ln.get("assignee"))
        paused.add_metric([a], 1.0 if ln.get("paused") else 0.0)
        counts = _dict(ln.get("counts"))
        for st in LIVE_STATUSES:
            tasks.add_metric([a, st], _num(counts.get(st)))
    yield paused
    yield tasks


def _go(name: str, signal: Mapping[str, Any]) -> Iterator[Metric]:
    g = GaugeMetricFamily(f"autonomy_{name}_go", f"1 when {name} is GO, 0 when NO_GO.")
    g.add_metric([], 1.0 if signal.get("state") == "GO" else 0.0)
    yield g
    stale = GaugeMetricFamily(f"autonomy_{name}_stale", f"1 when the {name} snapshot is stale.")
    stale.add_metric([], 1.0 if signal.get("stale") else 0.0)
    yield stale


def _criteria(criteria: Mapping[str, Any]) -> Iterator[Metric]:
    fails = GaugeMetricFamily("autonomy_handoff_criterion_consecutive_failures",
                              "Consecutive failing runs per handoff criterion.",
                              labels=["criterion"])
    no_go = GaugeMetricFamily("autonomy_handoff_criterion_no_go",
                              "1 when the criterion holds the handoff NO_GO.",
                              labels=["criterion"])
    for name, c in criteria.items():
        c = _dict(c)
        fails.add_metric([str(name)], _num(c.get("consecutiveFailures")))
        no_go.add_metric([str(name)], 1.0 if c.get("noGo") else 0.0)
    yield fails
    yield no_go


def _incident(inc: Mapping[str, Any]) -> Iterator[Metric]:
    g = GaugeMetricFamily("autonomy_ops_incident", "1 for the ops incident's current status.",
                          labels=["status"])
    for st in INCIDENT_STATUSES:
        g.add_metric([st], 1.0 if inc.get("status") == st else 0.0)
    yield g


def _counters(metrics: Mapping[str, Any]) -> Iterator[Metric]:
    claims = CounterMetricFamily("autonomy_claims", "Leases granted by claims.")
    claims.add_metric([], _num(metrics.get("claims")))
    yield claims
    guards = CounterMetricFamily("autonomy_guard_hits", "Duplicates refused, per guard.",
                                 labels=["guard"])
    for g in ("duplicate_claim_guard", "duplicate_complete_guard"):
        guards.add_metric([g], _num(metrics.get(f"guard:{g}")))
    for k, v in sorted(metrics.items()):
        if k.startswith("guard:") and k[6:] not in ("duplicate_claim_guard",
                                                     "duplicate_complete_guard"):
            guards.add_metric([k[6:]], _num(v))
    yield guards
    other = CounterMetricFamily("autonomy_events", "Other counters of the metrics hash.",
                                labels=["name"])
    for k, v in sorted(metrics.items()):
        if k != "claims" and not k.startswith("guard:"):
            other.add_metric([k], _num(v))
    yield other


def _fingerprints(fps: list[Mapping[str, Any]]) -> Iterator[Metric]:
    g = GaugeMetricFamily("autonomy_failure_fingerprint_count",
                          "Failures per fingerprint in the breaker window.",
                          labels=["fingerprint", "assignee"])
    for fp in fps:
        g.add_metric([str(fp.get("fingerprint")), str(fp.get("assignee"))],
                     _num(fp.get("count")))
    yield g
