"""The HTTP API over a real server: every action, its guards and error codes, the bearer
token, 503 when Redis or the database is unreachable, and the OpenAPI schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app import ops
from app.clock import FrozenClock
from app.settings import Settings
from app.storage.context import Context
from tests.api_server import client
from tests.conftest import make_settings
from tests.servers import free_port
from tests.test_bad_input import BAD_REQUESTS
from tests.test_lanes import snapshot

TOKEN = "s3cret-token-for-tests"
MUTATING_SAMPLES: dict[str, dict[str, Any]] = {
    "create": {"assignee": "coder", "title": "t"},
    "claim": {"assignee": "coder", "worker": "w1"},
    "heartbeat": {"taskId": 1, "leaseToken": "0" * 32},
    "complete": {"taskId": 1, "leaseToken": "0" * 32, "outcome": "success"},
    "complete_many": {"items": [{"taskId": 1, "leaseToken": "0" * 32}]},
    "release": {"taskId": 1, "leaseToken": "0" * 32},
    "pause_lane": {"assignee": "coder", "reason": "x"},
    "resume_lane": {"assignee": "coder"},
    "configure_lane": {"assignee": "coder", "maxInFlight": 2},
    "ops_incident": {"status": "warning", "reason": "disk filling"},
    "cancel": {"taskId": 1},
    "requeue": {"taskId": 1},
}


def _ctx(database_url: str, redis_url: str, prefix: str, clock: FrozenClock,
         **overrides: Any) -> Context:
    return Context.from_settings(make_settings(database_url, redis_url, prefix, **overrides),
                                 clock=clock)


@pytest.fixture
def api_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str,
            clock: FrozenClock) -> Iterator[Context]:
    """A context with an API token, on SQLite."""
    ctx = _ctx(sqlite_url, redis_server_url, redis_prefix, clock, api_token=TOKEN)
    yield ctx
    ctx.close()


@pytest.fixture
def http(api_ctx: Context) -> Iterator[httpx.Client]:
    """A client that sends the right token."""
    with client(api_ctx, TOKEN) as c:
        yield c


def call(http: httpx.Client, action: str, expect: int = 200, **fields: Any) -> dict[str, Any]:
    resp = http.post("/api/autonomy", json={"action": action, **fields})
    assert resp.status_code == expect, resp.text
    answer: dict[str, Any] = resp.json()
    assert answer["ok"] is (expect == 200), answer
    if expect != 200:
        assert answer["error"] and answer["message"], answer
    return answer


# --- every action ---------------------------------------------------------------------


@pytest.fixture
def ctx_with_token(settings: Settings, clock: FrozenClock) -> Iterator[Context]:
    """The parametrised (SQLite and PostgreSQL) context, with a token."""
    ctx = Context.from_settings(settings.model_copy(update={"api_token": SecretStr(TOKEN)}),
                                clock=clock)
    yield ctx
    ctx.close()


def test_a_lane_scenario_over_http_answers_as_the_spec_says(ctx_with_token: Context,
                                                            clock: FrozenClock) -> None:
    with client(ctx_with_token, TOKEN) as http:
        task = call(http, "create", assignee="coder", title="parse", priority=2,
                    payload={"repo": "x"}, actor="alice")["task"]
        assert task["payload"] == {"repo": "x"} and task["status"] == "todo"
        assert "leaseToken" not in task
        claimed = call(http, "claim", assignee="coder", worker="w1")
        assert claimed["task"]["id"] == task["id"] and claimed["task"]["claimedBy"] == "w1"
        token = claimed["lease"]["token"]
        guard = call(http, "claim", assignee="coder", worker="w2")
        assert guard["guard"] == "duplicate_claim_guard" and guard["leaseHolder"] == "w1"
        assert "lease" not in guard  # only the holder gets its token back
        clock.advance(seconds=10)
        beat = call(http, "heartbeat", taskId=task["id"], leaseToken=token)
        assert beat["taskId"] == task["id"] and beat["lease"]["token"] == token
        done = call(http, "complete", taskId=task["id"], leaseToken=token, outcome="success",
                    result={"pr": 7})
        assert done["task"]["status"] == "done" and done["task"]["result"] == {"pr": 7}
        again = call(http, "complete", taskId=task["id"], leaseToken=token, outcome="success")
        assert again["guard"] == "duplicate_complete_guard"
        assert call(http, "claim", assignee="coder", worker="w1")["task"] is None

        second = call(http, "create", assignee="coder", title="next")["task"]
        lease = call(http, "claim", assignee="coder", worker="w1")["lease"]
        released = call(http, "release", taskId=second["id"], leaseToken=lease["token"])
        assert released == {"ok": True, "action": "release", "taskId": second["id"],
                            "released": True}

        lane = call(http, "configure_lane", assignee="coder", maxInFlight=2)["lane"]
        assert lane["maxInFlight"] == 2
        paused = call(http, "pause_lane", assignee="coder", reason="freeze", actor="alice")
        assert paused["lane"]["paused"] is True and paused["alreadyPaused"] is False
        assert call(http, "pause_lane", assignee="coder")["alreadyPaused"] is True
        refused = call(http, "claim", 409, assignee="coder", worker="w1")
        assert refused["error"] == "lane_paused" and refused["reason"] == "freeze"
        assert refused["pausedAt"]
        resumed = call(http, "resume_lane", assignee="coder", actor="alice")
        assert resumed["lane"]["paused"] is False and resumed["wasPaused"] is True
        assert resumed["alreadyRunning"] is False  # kept for older clients
        assert call(http, "resume_lane", assignee="coder")["wasPaused"] is False

        kinds = {e["kind"] for e in call(http, "history", assignee="coder")["events"]}
        assert {"task_created", "lease_granted", "lane_paused", "lane_resumed",
                "claim_guard"} <= kinds
        task_events = call(http, "history", taskId=task["id"])["events"]
        assert {e["taskId"] for e in task_events} == {task["id"]}
        count = call(http, "fingerprint_count", fingerprint="coder:x", windowHours=1)
        assert count == {"ok": True, "action": "fingerprint_count", "fingerprint": "coder:x",
                         "count": 0, "windowHours": 1.0, "threshold": 3}


def test_three_identical_failures_over_http_pause_the_lane_and_file_remediation(
        http: httpx.Client, api_ctx: Context) -> None:
    ids = [call(http, "create", assignee="reviewer", title=f"r{i}")["task"]["id"]
           for i in range(3)]
    answers = []
    for _ in ids:
        c = call(http, "claim", assignee="reviewer", worker="rv")
        answers.append(call(http, "complete", taskId=c["task"]["id"],
                            leaseToken=c["lease"]["token"], outcome="failure",
                            validationReason="tests failed in 42 cases"))
    assert [a["fingerprintCount"] for a in answers] == [1, 2, 3]
    last = answers[-1]
    assert last["lanePaused"] is True and last["remediationTaskId"]
    assert last["failureFingerprint"].startswith("reviewer:tests failed in")
    tasks = http.get("/api/autonomy/tasks", params={"assignee": "reviewer"}).json()["tasks"]
    assert tasks and all(t["lanePaused"] for t in tasks if t["status"] == "todo")
    ops_tasks = http.get("/api/autonomy/tasks", params={"assignee": "ops"}).json()["tasks"]
    assert [t["kind"] for t in ops_tasks] == ["ops_remediation"]
    fp = last["failureFingerprint"]
    assert call(http, "fingerprint_count", fingerprint=fp)["count"] == 3
    assert call(http, "claim", 409, assignee="reviewer", worker="rv")["error"] == "lane_paused"


def test_fencing_refusals_over_http(http: httpx.Client, clock: FrozenClock) -> None:
    t = call(http, "create", assignee="coder", title="t")["task"]
    assert call(http, "heartbeat", 409, taskId=t["id"], leaseToken="0" * 32)["error"] \
        == "not_in_progress"
    old = call(http, "claim", assignee="coder", worker="w1")["lease"]["token"]
    clock.advance(seconds=3600)  # the lease expires; another worker takes the task
    assert call(http, "claim", assignee="coder", worker="w2")["task"]["id"] == t["id"]
    stale = call(http, "complete", 409, taskId=t["id"], leaseToken=old, outcome="success")
    assert stale["error"] == "stale_lease" and stale["taskId"] == t["id"]
    assert call(http, "heartbeat", 409, taskId=t["id"], leaseToken=old)["error"] == "stale_lease"
    assert call(http, "release", 404, taskId=999, leaseToken=old)["error"] == "task_not_found"
    assert call(http, "history", 404, taskId=999)["error"] == "task_not_found"


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(("request_", "code"), BAD_REQUESTS,
                         ids=[f"{dict(r).get('action')}-{c}-{i}"  # type: ignore[call-overload]
                              for i, (r, c) in enumerate(BAD_REQUESTS)])
def test_bad_input_over_http_gets_the_same_code_as_the_cli(
        http: httpx.Client, api_ctx: Context, request_: dict[str, Any], code: str) -> None:
    a = call(http, "create", assignee="coder", title="a", payload={"k": 1})["task"]
    call(http, "claim", assignee="coder", worker="w1")
    assert a["id"] == 1
    before = snapshot(api_ctx)
    resp = http.post("/api/autonomy", json=request_)
    answer = resp.json()
    assert answer["ok"] is False and answer["error"] == code, answer
    assert answer["message"]
    assert resp.status_code == (404 if code == "task_not_found" else 400)
    assert snapshot(api_ctx) == before


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_input"),
    (b"", "invalid_input"),
    (b"[1, 2]", "invalid_input"),
    (b'"create"', "invalid_input"),
    (b'{"action": "create", "assignee": "coder", "title": "t", "priority": NaN}',
     "invalid_input"),
    (b'{"action": "create", "assignee": "coder", "title": "a\\u0000b"}', "invalid_input"),
    (b'{"action": "create", "assignee": "coder", "title": "t", "payload": '
     + b'{"a": ' * 100 + b"1" + b"}" * 101, "invalid_input"),
    (json.dumps({"action": "create", "assignee": "coder", "title": "t",
                 "payload": {"x": "y" * 300_000}}).encode(), "body_too_large"),
    (b'{"action": "create", "assignee": 5, "title": "t"}', "invalid_assignee"),
    (b'{"action": "create", "assignee": "coder", "title": ["t"]}', "invalid_title"),
    (b'{"action": "create", "assignee": "coder", "title": "t", "actor": 5}', "invalid_worker"),
    (b'{"action": "create", "assignee": "coder", "title": "t", "priority": true}',
     "invalid_input"),
    (b'{"action": "create", "assignee": "coder", "title": "t", "priority": 1.5}',
     "invalid_input"),
    (b'{"action": "claim", "assignee": "coder"}', "invalid_worker"),
    (b'{"action": "complete", "taskId": 1, "leaseToken": 7, "outcome": "success"}',
     "invalid_lease_token"),
    (b'{"action": "complete", "taskId": 1, "leaseToken": "' + b"0" * 32
     + b'", "outcome": 1}', "invalid_outcome"),
    (b'{"action": "complete", "taskId": 1, "leaseToken": "' + b"0" * 32
     + b'", "outcome": "failure", "validationReason": 5}', "invalid_reason"),
    (b'{"action": "fingerprint_count", "fingerprint": "a:b", "windowHours": "2"}',
     "invalid_input"),
    (b'{"action": "ops_incident", "status": "on fire"}', "invalid_input"),
    (b'{"action": 5}', "invalid_action"),
])
def test_malformed_requests_get_400_with_a_stable_code(http: httpx.Client, api_ctx: Context,
                                                      body: bytes, code: str) -> None:
    before = snapshot(api_ctx)
    resp = http.post("/api/autonomy", content=body,
                     headers={"Content-Type": "application/json"})
    # an oversized body is refused from its Content-Length, unread (SPEC 4.8)
    assert resp.status_code == (413 if code == "body_too_large" else 400), resp.text
    answer = resp.json()
    assert answer["ok"] is False and answer["error"] == code and answer["message"], answer
    assert snapshot(api_ctx) == before


def test_unknown_paths_methods_and_queries_answer_ok_false(http: httpx.Client) -> None:
    resp = http.get("/api/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    resp = http.put("/api/autonomy", json={})
    assert resp.status_code == 405 and resp.json() == {
        "ok": False, "error": "method_not_allowed", "message": "Method Not Allowed"}
    for params in ({"limit": "lots"}, {"limit": 0}, {"status": "sleeping"},
                   {"assignee": "bad lane!"}):
        resp = http.get("/api/autonomy/tasks", params=params)
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["ok"] is False
        assert resp.json()["error"] in ("invalid_input", "invalid_assignee")


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("action", sorted(MUTATING_SAMPLES))
def test_a_mutating_action_needs_the_bearer_token(api_ctx: Context, action: str) -> None:
    body = {"action": action, **MUTATING_SAMPLES[action]}
    before = snapshot(api_ctx)
    with client(api_ctx) as http:
        missing = http.post("/api/autonomy", json=body)
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in ("Basic dXNlcjpwYXNz", "Bearer", "Token abc"):
            odd = http.post("/api/autonomy", json=body, headers={"Authorization": header})
            assert odd.status_code == 401 and odd.json()["error"] == "unauthorized", header
        wrong = http.post("/api/autonomy", json=body,
                          headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
        assert TOKEN not in wrong.text
        assert snapshot(api_ctx) == before
        right = http.post("/api/autonomy", json=body,
                          headers={"Authorization": f"bearer {TOKEN}"})
        assert right.status_code in (200, 404), right.text  # task 1 does not exist
        assert right.json()["ok"] is True or right.json()["error"] == "task_not_found"
    assert set(MUTATING_SAMPLES) == set(ops.MUTATING)


def test_with_a_token_reads_of_tasks_history_and_status_need_it_metrics_does_not(
        api_ctx: Context) -> None:
    # SPEC 4.8, 4.10: reads that show tasks need a credential (status too); every POST
    # is authorised before its body is read, so the read actions need it too; /metrics
    # carries no task text and stays open by default
    with client(api_ctx) as http:
        assert call(http, "history", 401, assignee="coder")["error"] == "unauthorized"
        assert call(http, "fingerprint_count", 401, fingerprint="coder:x")
        resp = http.get("/api/autonomy/tasks")
        assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"
        assert http.get("/api/autonomy/status").status_code == 401
        assert http.get("/metrics").status_code == 200
    with client(api_ctx, TOKEN) as http:
        assert http.get("/api/autonomy/status").status_code == 200
        assert call(http, "history", assignee="coder")["events"] == []
        assert http.get("/api/autonomy/tasks").json() == {"ok": True, "tasks": []}


def test_without_a_configured_token_mutations_need_none(sqlite_url: str, redis_server_url: str,
                                                       redis_prefix: str,
                                                       clock: FrozenClock) -> None:
    ctx = _ctx(sqlite_url, redis_server_url, redis_prefix, clock)
    try:
        with client(ctx) as http:
            assert call(http, "create", assignee="coder", title="t")["task"]["id"] == 1
    finally:
        ctx.close()


# --- unreachable services -------------------------------------------------------------------


def test_redis_unreachable_degrades_to_the_database_and_says_so(sqlite_url: str,
                                                                 redis_prefix: str,
                                                                 clock: FrozenClock) -> None:
    """SPEC 4.7: with no Redis at all a claim is answered by the database alone; status
    and /metrics say degraded."""
    ctx = _ctx(sqlite_url, f"redis://127.0.0.1:{free_port()}/0", redis_prefix, clock,
               redis_socket_timeout_s=1)
    try:
        with client(ctx) as http:
            call(http, "create", assignee="coder", title="t")
            answer = call(http, "claim", assignee="coder", worker="w1")
            assert answer["lease"]["token"]
            guarded = call(http, "claim", assignee="coder", worker="w2")
            assert guarded["guard"] == "duplicate_claim_guard"
            assert call(http, "status")["redis"] == "degraded"
            assert "autonomy_redis_degraded 1.0" in http.get("/metrics").text
    finally:
        ctx.close()


def test_database_unreachable_is_503_database_unavailable(redis_server_url: str,
                                                          redis_prefix: str,
                                                          clock: FrozenClock) -> None:
    ctx = _ctx(f"postgresql://postgres@127.0.0.1:{free_port()}/nope", redis_server_url,
               redis_prefix, clock, db_connect_timeout_s=1)
    try:
        with client(ctx) as http:
            for action, fields in (("create", {"assignee": "coder", "title": "t"}),
                                   ("claim", {"assignee": "coder", "worker": "w1"}),
                                   ("history", {"assignee": "coder"})):
                assert call(http, action, 503, **fields)["error"] == "database_unavailable"
            resp = http.get("/api/autonomy/tasks")
            assert resp.status_code == 503 and resp.json()["error"] == "database_unavailable"
    finally:
        ctx.close()


def test_an_unmigrated_database_is_503_database_not_migrated(tmp_path: Path,
                                                             redis_server_url: str,
                                                             redis_prefix: str,
                                                             clock: FrozenClock) -> None:
    ctx = _ctx(f"sqlite:///{tmp_path / 'empty.db'}", redis_server_url, redis_prefix, clock)
    try:
        with client(ctx) as http:
            answer = call(http, "create", 503, assignee="coder", title="t")
            assert answer["error"] == "database_not_migrated"
    finally:
        ctx.close()


# --- OpenAPI --------------------------------------------------------------------------------


def test_openapi_describes_every_action_request_and_answer(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    comps = schema["components"]["schemas"]
    union = comps["ActionRequest"]
    assert union["discriminator"]["propertyName"] == "action"
    assert set(union["discriminator"]["mapping"]) == set(ops.ACTIONS)
    for ref in union["discriminator"]["mapping"].values():
        assert ref.split("/")[-1] in comps
    post = schema["paths"]["/api/autonomy"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/ActionRequest"
    answers = post["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert {a["$ref"].split("/")[-1] for a in answers} >= {
        "ClaimActionAnswer", "HeartbeatActionAnswer", "ResumeLaneActionAnswer",
        "HistoryActionAnswer", "StatusActionAnswer", "FingerprintCountActionAnswer"}
    assert {"400", "401", "403", "404", "409", "503"} <= set(post["responses"])
    assert {"AutonomyApiToken": []} in post["security"] and {} in post["security"]
    assert "422" not in json.dumps({p: {m: op["responses"] for m, op in ops_.items()}
                                    for p, ops_ in schema["paths"].items()})
    assert "HTTPValidationError" not in comps
    assert {"/api/autonomy", "/api/autonomy/status", "/api/autonomy/tasks",
            "/metrics"} <= set(schema["paths"])
