"""One definition per input rule (issue 12): the OpenAPI document states exactly the limits
the server enforces. For every limit of every action's fields in a server's
``/openapi.json`` (served with non-default limits, so they must come from the settings),
a request at the limit and one past it by 1 are sent over HTTP and through the in-process
API (``app.ops.dispatch``, what the CLI and ``LocalClient`` call): at the limit the field
is never refused, past it the field is refused (400, naming it) -- on both paths alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from app import ops
from app.errors import AutonomyError, InvalidInput
from app.storage.context import Context
from tests.api_server import client
from tests.conftest import make_settings

TOKEN = "limits-token"
LIMITS = {"assignee_max_len": 20, "worker_max_len": 30, "title_max_len": 40,
          "reason_max_len": 50,
          # a claim's waitMs at its limit waits that long on an empty lane: keep it short
          "claim_wait_max_ms": 300}
BASE: dict[str, Any] = {
    "assignee": "lane", "worker": "w1", "title": "t", "priority": 0, "taskId": 1,
    "leaseToken": "0" * 32, "outcome": "success", "validationReason": "why", "reason": "why",
    "actor": "a1", "maxInFlight": 2, "fingerprint": "lane:x", "windowHours": 1,
    "status": "ok", "items": [{"taskId": 1, "leaseToken": "0" * 32}],
}


@pytest.fixture
def lctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=TOKEN, **LIMITS))
    yield ctx
    ctx.close()


def _constraints(prop: dict[str, Any]) -> dict[str, Any]:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            return {k: v for k, v in branch.items()
                    if k in ("maxLength", "minLength", "maximum", "minimum",
                             "exclusiveMinimum")} | {"type": branch.get("type")}
    return {}


def _requests(openapi: dict[str, Any]) -> list[dict[str, Any]]:
    """The request schemas (the answers name their action too: ``ClaimActionAnswer``)."""
    comps = openapi["components"]["schemas"]
    refs = comps["ActionRequest"]["discriminator"]["mapping"].values()
    return [comps[ref.split("/")[-1]] for ref in refs]


def cases(openapi: dict[str, Any]) -> list[tuple[str, str, str, Any, bool]]:
    """(action, field, limit, value, valid) for every limit the document states."""
    out = []
    for schema in _requests(openapi):
        action = schema.get("properties", {}).get("action", {}).get("const")
        if action is None:
            continue
        for field, prop in schema["properties"].items():
            c = _constraints(prop)
            text = c.get("type") == "string"
            num: Any = float if c.get("type") == "number" else int
            for limit, edge in c.items():
                if limit == "maxLength":
                    out += [(action, field, limit, "a" * edge, True),
                            (action, field, limit, "a" * (edge + 1), False)]
                elif limit == "minLength" and text and edge > 0:
                    out += [(action, field, limit, "a" * edge, True),
                            (action, field, limit, "a" * (edge - 1), False)]
                elif limit == "maximum":
                    out += [(action, field, limit, num(edge), True),
                            (action, field, limit, num(edge + 1), False)]
                elif limit == "minimum":
                    out += [(action, field, limit, num(edge), True),
                            (action, field, limit, num(edge - 1), False)]
                elif limit == "exclusiveMinimum":
                    out += [(action, field, limit, num(edge + 1), True),
                            (action, field, limit, num(edge), False)]
    return out


def request_for(openapi: dict[str, Any], action: str, field: str, value: Any
                ) -> dict[str, Any]:
    schema = next(s for s in _requests(openapi)
                  if s.get("properties", {}).get("action", {}).get("const") == action)
    body = {"action": action}
    for name in schema.get("required", []):
        if name != "action":
            body[name] = BASE[name]
    if action == "history" and field != "taskId":
        body["assignee"] = BASE["assignee"]
    body[field] = value
    return body


def refused_for(status: int, answer: dict[str, Any], field: str) -> bool:
    return status == 400 and answer.get("field") == field


def test_every_limit_in_the_openapi_document_is_the_limit_the_server_enforces(
        lctx: Context) -> None:
    with client(lctx, TOKEN) as http:
        openapi = http.get("/openapi.json").json()
        all_cases = cases(openapi)
        # the limits come from the settings (and the taskId column's real maximum)
        stated = {(a, f, lim): v for a, f, lim, v, ok in all_cases if ok}
        assert stated[("create", "assignee", "maxLength")] == "a" * 20
        assert stated[("claim", "worker", "maxLength")] == "a" * 30
        assert stated[("create", "title", "maxLength")] == "a" * 40
        assert stated[("pause_lane", "reason", "maxLength")] == "a" * 50
        assert stated[("heartbeat", "taskId", "maximum")] == 2**31 - 1
        assert stated[("claim", "waitMs", "maximum")] == 300
        assert len(all_cases) >= 60, len(all_cases)
        disagreements = []
        for action, field, limit, value, valid in all_cases:
            body = request_for(openapi, action, field, value)
            resp = http.post("/api/autonomy", json=body)
            assert resp.status_code < 500, (body, resp.text)
            over_http = refused_for(resp.status_code, resp.json(), field)
            try:
                ops.dispatch(lctx, body)
                in_process = False
            except InvalidInput as e:
                in_process = e.details.get("field") == field
            except AutonomyError:
                in_process = False
            if over_http == valid or in_process == valid:
                disagreements.append((action, field, limit, str(value)[:12], valid,
                                      over_http, in_process, resp.text[:120]))
    assert disagreements == [], disagreements


def test_the_schema_follows_the_settings(sqlite_url: str, redis_server_url: str,
                                         redis_prefix: str) -> None:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              title_max_len=7))
    try:
        with client(ctx) as http:
            schema = http.get("/openapi.json").json()["components"]["schemas"]
            assert schema["CreateRequest"]["properties"]["title"]["maxLength"] == 7
            resp = http.post("/api/autonomy", json={"action": "create", "assignee": "a",
                                                    "title": "12345678"})
            assert resp.status_code == 400 and resp.json()["field"] == "title"
    finally:
        ctx.close()
