"""The task lifecycle (SPEC 4.11) through the HTTP API and the CLI, on SQLite and
PostgreSQL: the same answers and codes as the Python API (``tests/test_lifecycle.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from app.clock import FrozenClock
from app.storage.context import Context
from tests.api_server import client


def call(http: httpx.Client, action: str, expect: int = 200, **fields: Any) -> dict[str, Any]:
    resp = http.post("/api/autonomy", json={"action": action, **fields})
    assert resp.status_code == expect, resp.text
    answer: dict[str, Any] = resp.json()
    assert answer["ok"] is (expect == 200), answer
    return answer


def test_the_lifecycle_over_http(ctx: Context, clock: FrozenClock) -> None:
    with client(ctx) as http:
        lane = call(http, "configure_lane", assignee="coder", maxAttempts=1,
                    backoffBaseS=0)["lane"]
        assert lane["maxAttempts"] == 1
        first = call(http, "create", assignee="coder", title="t", dedupeKey="pr-1")["task"]
        again = call(http, "create", assignee="coder", title="t", dedupeKey="pr-1")
        assert again["guard"] == "duplicate_create_guard" and again["task"]["id"] == first["id"]
        later = call(http, "create", assignee="coder", title="later", delayS=60)["task"]
        assert later["notBefore"] is not None
        bad = call(http, "create", 400, assignee="coder", title="t", notBefore="soon")
        assert (bad["error"], bad["field"]) == ("invalid_input", "notBefore")
        bad = call(http, "create", 400, assignee="coder", title="t", delayS=-1)
        assert (bad["error"], bad["field"]) == ("invalid_input", "delayS")
        # a failure at maxAttempts ends dead; requeue brings it back
        c = call(http, "claim", assignee="coder", worker="w1")
        assert c["task"]["id"] == first["id"]
        dead = call(http, "complete", taskId=first["id"], leaseToken=c["lease"]["token"],
                    outcome="failure", validationReason="boom")["task"]
        assert dead["status"] == "dead" and dead["lastValidationReason"] == "boom"
        listed = http.get("/api/autonomy/tasks", params={"status": "dead"}).json()["tasks"]
        assert [t["id"] for t in listed] == [first["id"]]
        refused = call(http, "requeue", 409, taskId=later["id"])
        assert refused["error"] == "not_dead"
        assert call(http, "requeue", taskId=first["id"])["task"]["status"] == "todo"
        # cancel: the holder's heartbeat and complete hear task_cancelled
        c = call(http, "claim", assignee="coder", worker="w1")
        assert c["task"]["id"] == first["id"]
        assert call(http, "cancel", taskId=first["id"])["task"]["status"] == "cancelled"
        for action, extra in (("heartbeat", {}), ("complete", {"outcome": "success"})):
            got = call(http, action, 409, taskId=first["id"], leaseToken=c["lease"]["token"],
                       **extra)
            assert got["error"] == "task_cancelled"
        # the slot is free again; the only todo task is not due yet
        assert call(http, "claim", assignee="coder", worker="w2")["task"] is None
        assert call(http, "cancel", 404, taskId=999)["error"] == "task_not_found"
        # the list action pages by keyset
        page = call(http, "tasks", assignee="coder", limit=1)
        assert [t["id"] for t in page["tasks"]] == [later["id"]]
        assert page["nextAfter"] == later["id"]
        rest = call(http, "tasks", assignee="coder", limit=1, after=page["nextAfter"])
        assert [t["id"] for t in rest["tasks"]] == [first["id"]]
        assert call(http, "tasks", 400, status="sleeping")["field"] == "status"
        schema = http.get("/openapi.json").json()["components"]["schemas"]
        assert "dead" in schema["TaskWire"]["properties"]["status"]["enum"]
        assert {"dedupeKey", "notBefore", "delayS"} <= set(
            schema["CreateRequest"]["properties"])


@pytest.mark.slow
def test_the_lifecycle_through_the_cli(database_url: str, redis_server_url: str,
                                       redis_prefix: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_server_url,
               AUTONOMY_REDIS_PREFIX=redis_prefix)

    def cli(*args: str, code: int = 0) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        answer: dict[str, Any] = json.loads(proc.stdout)
        return answer

    lane = cli("lane", "coder", "--max-attempts", "1", "--backoff-base-s", "0")["lane"]
    assert lane["maxAttempts"] == 1 and lane["backoffBaseS"] == 0
    made = cli("create", "coder", "t", "--dedupe-key", "k1")["task"]
    assert cli("create", "coder", "t", "--dedupe-key", "k1")["guard"] == \
        "duplicate_create_guard"
    delayed = cli("create", "coder", "later", "--delay-s", "600")["task"]
    assert delayed["notBefore"] is not None
    assert cli("create", "coder", "x", "--not-before", "nope", code=2)["error"] == \
        "invalid_input"
    c = cli("claim", "coder", "w1")
    assert c["task"]["id"] == made["id"]
    failed = cli("complete", str(made["id"]), c["lease"]["token"], "--outcome", "failure",
                 "--reason", "boom")
    assert failed["task"]["status"] == "dead"
    assert [t["id"] for t in cli("tasks", "--status", "dead")["tasks"]] == [made["id"]]
    assert cli("requeue", str(made["id"]))["task"]["status"] == "todo"
    assert cli("cancel", str(made["id"]))["task"]["status"] == "cancelled"
    assert cli("cancel", str(made["id"]))["alreadyCancelled"] is True
    listed = cli("tasks", "--lane", "coder", "--limit", "1")
    assert [t["id"] for t in listed["tasks"]] == [delayed["id"]]
    rest = cli("tasks", "--lane", "coder", "--limit", "1", "--after",
               str(listed["nextAfter"]))
    assert [t["id"] for t in rest["tasks"]] == [made["id"]]
    assert cli("tasks", "--kind", "ops_remediation")["tasks"] == []
    assert cli("requeue", str(delayed["id"]), code=1)["error"] == "not_dead"


def test_dead_tasks_show_in_status_metrics_and_the_panel_with_a_requeue_button(
        ctx: Context) -> None:
    from app.ops import lane_control, lanes

    lane_control.configure_lane(ctx, assignee="coder", max_attempts=1)
    dead_id = lanes.create(ctx, assignee="coder", title="doomed")["task"]["id"]
    live_id = lanes.create(ctx, assignee="coder", title="alive")["task"]["id"]
    c = lanes.claim(ctx, assignee="coder", worker="w1")
    lanes.complete(ctx, task_id=dead_id, lease_token=c["lease"]["token"], outcome="failure",
                   validation_reason="boom")
    with client(ctx) as http:
        status = http.get("/api/autonomy/status").json()
        lane = next(ln for ln in status["lanes"] if ln["assignee"] == "coder")
        assert lane["counts"] == {"todo": 1, "in_progress": 0, "dead": 1}
        assert lane["maxAttempts"] == 1
        assert 'autonomy_lane_dead_tasks{lane="coder"} 1.0' in http.get("/metrics").text
        every = http.get("/").text
        assert f'data-task="{dead_id}"' in every and f'data-task="{live_id}"' in every
        only_dead = http.get("/panel/sections", params={"status": "dead"}).text
        assert f'<button type="button" class="requeue" data-task="{dead_id}">' in only_dead
        assert f'data-task="{live_id}"' not in only_dead
        # a filter that is not one is ignored, never an error
        assert http.get("/", params={"status": "<script>"}).status_code == 200
