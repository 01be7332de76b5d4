"""``GET /metrics``: the Prometheus text carries the figures an operator alerts on."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.clock import FrozenClock
from app.ops.checks import handoff
from app.storage import locks
from app.storage.context import Context
from tests.test_api import TOKEN, api_ctx, call, http

__all__ = ["api_ctx", "http"]  # fixtures shared with test_api


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_show_locks_pauses_go_and_guard_hits(http: httpx.Client, api_ctx: Context,
                                                     clock: FrozenClock) -> None:
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
    assert m[("autonomy_lanes_paused", ())] == 1
    assert m[("autonomy_lane_paused", (("assignee", "ops2"),))] == 1
    assert m[("autonomy_lane_tasks", (("assignee", "coder"), ("status", "todo")))] == 1
    assert m[("autonomy_lane_tasks", (("assignee", "coder"), ("status", "in_progress")))] == 1
    assert m[("autonomy_handoff_go", ())] == 0
    assert m[("autonomy_claims_total", ())] == 1
    assert m[("autonomy_guard_hits_total", (("guard", "duplicate_claim_guard"),))] == 1
    assert m[("autonomy_guard_hits_total", (("guard", "duplicate_complete_guard"),))] == 0
