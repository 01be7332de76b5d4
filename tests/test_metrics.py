"""``GET /metrics``: the Prometheus text carries the figures an operator alerts on, under
names that follow the Prometheus naming rules, and the shipped dashboard and alert rules
use only names that are exported."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.api import metrics
from app.clock import FrozenClock
from app.ops.checks import handoff, jobs, status
from app.storage import beat_guard, leader, locks
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import free_port
from tests.test_api import TOKEN, api_ctx, call, http
from tests.test_cli import cli

__all__ = ["api_ctx", "http"]  # fixtures shared with test_api

MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
# every label /metrics may carry: each has a bounded set of values (lanes and jobs are
# configuration; the rest are fixed sets). No reason, no fingerprint, no task id; and not
# `job` or `instance`, which Prometheus sets on every series it scrapes.
BOUNDED_LABELS = {"lane", "job_name", "status", "state", "criterion", "guard", "le",
                  "version", "python",
                  "policy"}  # Redis's maxmemory-policy: one of its eight names
# a name that says its value is a time must carry the unit (``over_budget`` is a flag)
TIME_NAME = re.compile(r"_(elapsed|duration|timestamp|latency|age|ttl|time)(_|$)"
                       r"|(?<!_over)_budget$")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _fail_once(http: httpx.Client, lane: str, reason: str) -> None:
    call(http, "create", assignee=lane, title="will fail")
    claimed = call(http, "claim", assignee=lane, worker="w-fail")
    call(http, "complete", taskId=claimed["task"]["id"], leaseToken=claimed["lease"]["token"],
         outcome="failure", validationReason=reason)


@pytest.fixture
def beat_leader(api_ctx: Context) -> Iterator[str]:
    """A beat leading (through ``beat_guard.lead``) for the duration of the test."""
    stop = threading.Event()
    token = beat_guard.lead(api_ctx, holder="host:1:beat", stop=stop, on_lost=stop.set)
    assert token is not None
    yield token
    stop.set()
    leader.release(api_ctx, token)


@pytest.fixture
def busy_scrape(http: httpx.Client, api_ctx: Context, clock: FrozenClock,
                beat_leader: str) -> str:
    """/metrics after a bit of everything: claims and guard hits, a paused lane, a failing
    fingerprint, every periodic job run once, a run-lock held past its budget."""
    call(http, "create", assignee="coder", title="a")
    call(http, "create", assignee="coder", title="b")
    call(http, "claim", assignee="coder", worker="w1")
    call(http, "claim", assignee="coder", worker="w1")  # guard hit
    _fail_once(http, "reviewer", "missing tests in 3 files")
    call(http, "pause_lane", assignee="reviewer", reason="freeze")
    for job in jobs.JOB_NAMES:
        jobs.run_job(api_ctx, job)
    locks.acquire(api_ctx, "self_heal", budget_ms=1_000, holder="h:1:t")
    clock.advance(seconds=5)
    resp = http.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def test_metrics_show_locks_pauses_verdicts_and_guard_hits(
        http: httpx.Client, api_ctx: Context, clock: FrozenClock) -> None:
    assert api_ctx.settings.api_token is not None
    assert api_ctx.settings.api_token.get_secret_value() == TOKEN
    call(http, "create", assignee="coder", title="a")
    call(http, "create", assignee="coder", title="b")
    call(http, "claim", assignee="coder", worker="w1")
    assert call(http, "claim", assignee="coder", worker="w1")["guard"] == "duplicate_claim_guard"
    call(http, "create", assignee="ops2", title="c")
    call(http, "pause_lane", assignee="ops2", reason="freeze")
    locks.acquire(api_ctx, "self_heal", budget_ms=1_000, holder="h:1:t")
    locks.acquire(api_ctx, "readiness", budget_ms=60_000, holder="h:2:t")
    call(http, "ops_incident", status="critical", reason="outage")
    handoff.run_handoff(api_ctx)
    handoff.run_handoff(api_ctx)  # ops failing twice in a row: NO_GO
    clock.advance(seconds=5)

    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    m = _samples(resp.text)
    assert m[("autonomy_run_locks_held", ())] == 2
    assert m[("autonomy_run_locks_over_budget", ())] == 1
    assert m[("autonomy_run_lock_held", (("job_name", "self_heal"),))] == 1
    assert m[("autonomy_run_lock_held", (("job_name", "status"),))] == 0
    assert m[("autonomy_run_lock_over_budget", (("job_name", "self_heal"),))] == 1
    assert m[("autonomy_run_lock_over_budget", (("job_name", "readiness"),))] == 0
    assert m[("autonomy_run_lock_elapsed_seconds", (("job_name", "readiness"),))] == 5
    assert ("autonomy_run_lock_elapsed_seconds", (("job_name", "status"),)) not in m  # not held
    assert m[("autonomy_run_lock_budget_seconds", (("job_name", "status"),))] == 15
    assert m[("autonomy_lanes_paused", ())] == 1
    assert m[("autonomy_lane_paused", (("lane", "ops2"),))] == 1
    assert m[("autonomy_lane_tasks", (("lane", "coder"), ("status", "todo")))] == 1
    assert m[("autonomy_lane_tasks", (("lane", "coder"), ("status", "in_progress")))] == 1
    assert m[("autonomy_handoff_state", (("state", "NO_GO"),))] == 1
    assert m[("autonomy_handoff_state", (("state", "GO"),))] == 0
    assert m[("autonomy_handoff_state", (("state", "unknown"),))] == 0
    assert m[("autonomy_ops_incident_status", (("status", "critical"),))] == 1
    assert m[("autonomy_claims_total", ())] == 1
    assert m[("autonomy_guard_hits_total", (("guard", "duplicate_claim_guard"),))] == 1
    assert m[("autonomy_guard_hits_total", (("guard", "duplicate_complete_guard"),))] == 0
    build = [k for k in m if k[0] == "autonomy_build_info"]
    assert len(build) == 1 and m[build[0]] == 1
    assert ("version", metrics.__version__) in build[0][1]


def test_a_verdict_never_computed_is_unknown_not_no_go(http: httpx.Client) -> None:
    m = _samples(http.get("/metrics").text)
    for signal in ("handoff", "readiness"):
        assert m[(f"autonomy_{signal}_state", (("state", "unknown"),))] == 1
        assert m[(f"autonomy_{signal}_state", (("state", "NO_GO"),))] == 0
        assert m[(f"autonomy_{signal}_state", (("state", "GO"),))] == 0


def test_fingerprints_are_summarised_per_lane_never_labels(http: httpx.Client) -> None:
    """The failure reason is free text: /metrics carries per-lane counts of the breaker
    window, and no label value holds the reason."""
    _fail_once(http, "reviewer", "missing tests in 3 files")
    _fail_once(http, "reviewer", "missing tests in 7 files")  # same fingerprint
    _fail_once(http, "reviewer", "lint failed")
    call(http, "create", assignee="coder", title="quiet lane")
    text = http.get("/metrics").text
    m = _samples(text)
    assert m[("autonomy_breaker_window_failures", (("lane", "reviewer"),))] == 3
    assert m[("autonomy_breaker_window_fingerprints", (("lane", "reviewer"),))] == 2
    assert m[("autonomy_breaker_top_fingerprint_failures", (("lane", "reviewer"),))] == 2
    assert m[("autonomy_breaker_window_failures", (("lane", "coder"),))] == 0
    assert m[("autonomy_breaker_threshold", ())] == 3
    assert "missing" not in text and "lint" not in text
    assert "autonomy_failure_fingerprint_count" not in text


@pytest.mark.slow
def test_job_duration_histogram_and_last_success_outlive_the_process_that_ran_the_job(
        http: httpx.Client, api_ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job run by another process (``autonomy check``) shows in this API's /metrics:
    the figures are persisted with the job's run record, not kept in memory."""
    s = api_ctx.settings
    env = {"DATABASE_URL": s.database_url, "REDIS_URL": str(s.redis_url),
           "AUTONOMY_REDIS_PREFIX": s.redis_prefix, "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        assert cli(env, "check", "readiness").returncode == 0
    m = _samples(http.get("/metrics").text)
    job = (("job_name", "readiness"),)
    assert m[("autonomy_job_duration_seconds_count", job)] == 2
    assert m[("autonomy_job_duration_seconds_bucket", (*job, ("le", "+Inf")))] == 2
    assert m[("autonomy_job_duration_seconds_sum", job)] >= 0
    assert m[("autonomy_job_duration_seconds_count", (("job_name", "status"),))] == 0
    assert m[("autonomy_job_failures_total", job)] == 0
    last_ok = m[("autonomy_job_last_success_timestamp_seconds", job)]
    assert ("autonomy_job_last_success_timestamp_seconds", (("job_name", "status"),)) not in m

    def broken(_: Context, _fence: object) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setitem(jobs.CHECKS, "readiness", broken)
    with pytest.raises(RuntimeError):
        jobs.run_job(api_ctx, "readiness")
    m = _samples(http.get("/metrics").text)
    assert m[("autonomy_job_duration_seconds_count", job)] == 3
    assert m[("autonomy_job_failures_total", job)] == 1
    assert m[("autonomy_job_last_success_timestamp_seconds", job)] == last_ok


def test_a_skipped_run_does_not_lose_the_statistics(api_ctx: Context) -> None:
    jobs.run_job(api_ctx, "status")
    locks.acquire(api_ctx, "status", budget_ms=60_000, holder="elsewhere:1:t")
    assert jobs.run_job(api_ctx, "status")["skipped"] == "already_running"
    view = status.build_status(api_ctx)["workflowHealth"]["jobs"]["status"]
    assert view["runs"] == 1 and view["durationHistogram"]["count"] == 1
    assert view["skipped"] == "already_running"


def test_redis_and_beat_come_from_the_payload_when_it_has_them() -> None:
    payload = {"redis": "degraded",
               "beat": {"leader": None, "since": None, "standbys": ["b:2", "b:3"]}}
    m = _samples(metrics.render(payload).decode())
    assert m[("autonomy_redis_degraded", ())] == 1
    assert m[("autonomy_beat_leader_present", ())] == 0
    assert m[("autonomy_beat_standbys", ())] == 2


def test_status_says_redis_degraded_when_redis_does_not_answer(
        sqlite_url: str, redis_prefix: str, clock: FrozenClock) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    ctx = Context.from_settings(make_settings(sqlite_url, dead, redis_prefix,
                                              redis_socket_timeout_s=0.5), clock=clock)
    try:
        payload = status.build_status(ctx)
        assert payload["redis"] == "degraded"
        m = _samples(metrics.render(payload).decode())
        assert m[("autonomy_redis_degraded", ())] == 1
    finally:
        ctx.close()


def test_beat_leader_and_redis_fallbacks_on_a_real_scrape(busy_scrape: str) -> None:
    m = _samples(busy_scrape)
    assert m[("autonomy_redis_degraded", ())] == 0
    assert m[("autonomy_beat_leader_present", ())] == 1
    # the leader is a lease, not a job's run-lock: no ten-year budget among the run-locks
    assert m[("autonomy_run_locks_held", ())] == 1  # self_heal's
    assert not [k for k in m if k[0].startswith("autonomy_run_lock")
                and ("job_name", "beat") in k[1]]
    assert max(v for k, v in m.items() if k[0] == "autonomy_run_lock_budget_seconds") <= 60


def test_no_leader_reads_zero(http: httpx.Client) -> None:
    assert _samples(http.get("/metrics").text)[("autonomy_beat_leader_present", ())] == 0


# --- the naming rules -------------------------------------------------------------------


def _type_lines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def naming_problems(text: str) -> list[str]:
    """Every breach of the naming rules in one exposition (empty when none)."""
    problems = []
    sample_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}
    for name, kind in _type_lines(text).items():
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",)}
        if not any(name + sfx in sample_names for sfx in suffixes.get(kind, ("",))):
            problems.append(f"{name}: family without samples")
    for fam in text_string_to_metric_families(text):
        n, kind = fam.name, fam.type
        if not re.fullmatch(r"autonomy_[a-z][a-z0-9]*(_[a-z0-9]+)*", n):
            problems.append(f"{n}: not autonomy_ snake_case")
        if not fam.documentation.strip():
            problems.append(f"{n}: no HELP")
        if kind == "counter":
            if not all(s.name == n + "_total" for s in fam.samples):
                problems.append(f"{n}: counter samples must end _total")
        elif kind == "gauge":
            if re.search(r"_(total|count|sum|bucket|created)$", n):
                problems.append(f"{n}: gauge with a counter/summary suffix")
            if n.endswith("_info") and (n != "autonomy_build_info"
                                        or any(s.value != 1 for s in fam.samples)):
                problems.append(f"{n}: _info is the build info gauge, always 1")
        elif kind == "histogram":
            if not n.endswith("_seconds"):
                problems.append(f"{n}: histogram without a unit")
        else:
            problems.append(f"{n}: unexpected type {kind}")
        if TIME_NAME.search(n) and not n.endswith("_seconds"):
            problems.append(f"{n}: a time without _seconds")
        if re.search(r"_(ms|milliseconds|minutes|hours|days)(_|$)", n):
            problems.append(f"{n}: not a base unit")
        for s in fam.samples:
            problems += _label_problems(n, s)
    return problems


def _label_problems(family: str, s: Sample) -> list[str]:
    out = [f"{family}: label {k} is a target label Prometheus sets" for k in s.labels
           if k in ("job", "instance")]
    out += [f"{family}: unbounded label {k}" for k in s.labels if k not in BOUNDED_LABELS]
    out += [f"{family}: label {k} holds free text {v!r}" for k, v in s.labels.items()
            if len(v) > 64 or " " in v]
    return out


def test_every_name_follows_the_prometheus_naming_rules(busy_scrape: str) -> None:
    assert naming_problems(busy_scrape) == []


def test_the_naming_check_catches_the_old_mistakes() -> None:
    """The rules bite: the names /metrics used to export fail them."""
    old = ("# HELP autonomy_failure_fingerprint_count Failures per fingerprint.\n"
           "# TYPE autonomy_failure_fingerprint_count gauge\n"
           'autonomy_failure_fingerprint_count{fingerprint="coder:missing tests",'
           'assignee="coder"} 2.0\n'
           "# HELP autonomy_events Other counters.\n# TYPE autonomy_events counter\n"
           "# HELP autonomy_lock_elapsed_ms Elapsed.\n# TYPE autonomy_lock_elapsed_ms gauge\n"
           "autonomy_lock_elapsed_ms 5.0\n"
           "# HELP autonomy_job_ok Ok.\n# TYPE autonomy_job_ok gauge\n"
           'autonomy_job_ok{job="status"} 1.0\n')
    problems = naming_problems(old)
    assert any("gauge with a counter/summary suffix" in p for p in problems)
    assert any("unbounded label fingerprint" in p for p in problems)
    assert any("free text" in p for p in problems)
    assert any("autonomy_events: family without samples" in p for p in problems)
    assert any("autonomy_lock_elapsed_ms: a time without _seconds" in p for p in problems)
    assert any("label job is a target label" in p for p in problems)


def test_no_family_is_always_empty(busy_scrape: str, api_ctx: Context) -> None:
    """Every family the collector knows has samples once the fleet has done a bit of
    everything."""
    payload = status.build_status(api_ctx)
    known = {f.name for f in metrics.StatusCollector(payload).all_families()}
    exported = {f.name for f in text_string_to_metric_families(busy_scrape)}
    assert known - exported == set()


# --- the shipped dashboard and alert rules -----------------------------------------------


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bautonomy_[a-z0-9_]+", expr))


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def _exported_sample_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_alert_rules_cover_the_incidents_and_use_only_exported_names(busy_scrape: str) -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for r in alerts.values():
        assert r["expr"] and r["labels"]["severity"] in ("page", "ticket"), r
        assert r["annotations"]["summary"], r
    exprs = {name: r["expr"] for name, r in alerts.items()}
    assert alerts["AutonomyHandoffNoGo"]["for"] == "10m"
    assert 'autonomy_handoff_state{state="NO_GO"}' in exprs["AutonomyHandoffNoGo"]
    assert "autonomy_run_lock_over_budget" in exprs["AutonomyRunLockOverBudget"]
    assert "autonomy_lane_paused" in exprs["AutonomyLanePaused"]
    assert "autonomy_beat_leader_present" in exprs["AutonomyBeatWithoutLeader"]
    assert "autonomy_redis_degraded" in exprs["AutonomyRedisDegraded"]
    used = set().union(*(_names_in(e) for e in exprs.values()))
    assert used - _exported_sample_names(busy_scrape) == set()


def test_dashboard_uses_only_exported_names(busy_scrape: str) -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dash["title"] and dash["panels"]
    exprs = list(_exprs(dash))
    assert len(exprs) >= 8
    used = set().union(*(_names_in(e) for e in exprs))
    assert used and used - _exported_sample_names(busy_scrape) == set()
    # every panel queries something, through the datasource variable
    for p in dash["panels"]:
        if p.get("type") != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]

