"""The OpenAPI document as a client generator reads it (``openapi-python-client``, issue
23 item 7): explicit, unique operation ids; a tag on every operation; every time in an
answer a ``date-time``; and the action endpoint's 200 answer a ``oneOf`` discriminated on
``action``, mapping every action to a schema whose ``action`` is that one value -- which
the server's answers echo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app import ops
from app.api import schemas
from tests.test_api import api_ctx, http

__all__ = ["api_ctx", "http"]

METHODS = {"get", "post", "put", "patch", "delete"}
TIME_NAMES = {"at", "since", "notBefore"}


@pytest.fixture
def openapi(http: httpx.Client) -> dict[str, Any]:
    """The document the server publishes at ``/openapi.json``."""
    doc: dict[str, Any] = http.get("/openapi.json").json()
    return doc


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def _is_time(prop: dict[str, Any]) -> bool:
    if prop.get("format") == "date-time":
        return True
    return any(_is_time(p) for p in prop.get("anyOf", []) if p.get("type") != "null")


def test_every_operation_has_an_explicit_unique_id_and_a_tag(openapi: dict[str, Any]) -> None:
    ops_ = list(_operations(openapi))
    ids = [op["operationId"] for _, _, op in ops_]
    assert len(ids) == len(set(ids)) == len(ops_) >= 6
    for path, method, op in ops_:
        # FastAPI's automatic ids read ``{function}_{path}_{method}``
        assert not op["operationId"].endswith(f"_{method}"), (path, op["operationId"])
        assert op.get("tags"), (path, method)
    declared = {t["name"] for t in openapi.get("tags", [])}
    assert {t for _, _, op in ops_ for t in op["tags"]} <= declared
    assert {op["operationId"] for _, _, op in ops_} >= {"act", "get_status", "list_tasks"}


def test_every_time_field_of_an_answer_is_a_date_time(openapi: dict[str, Any]) -> None:
    times = []
    for name, schema in openapi["components"]["schemas"].items():
        if name.endswith("Request") or name == "ClaimNext":
            continue  # requests: what the server accepts, checked by its own rules
        for field, prop in (schema.get("properties") or {}).items():
            if field.endswith("At") or field in TIME_NAMES:
                times.append((name, field))
                assert _is_time(prop), (name, field, prop)
    assert {("Lease", "expiresAt"), ("TaskWire", "createdAt"), ("EventWire", "at"),
            ("LaneWire", "resumedAt"), ("StatusAnswer", "generatedAt"),
            ("FingerprintWire", "lastAt")} <= set(times)


def test_the_action_answer_is_a_one_of_discriminated_on_every_action(
        openapi: dict[str, Any]) -> None:
    post = openapi["paths"]["/api/autonomy"]["post"]
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert "anyOf" not in answer
    assert answer["discriminator"]["propertyName"] == "action"
    mapping = answer["discriminator"]["mapping"]
    assert set(mapping) == set(ops.ACTIONS) == set(schemas.action_names())
    assert sorted(r["$ref"] for r in answer["oneOf"]) == sorted(mapping.values())
    comps = openapi["components"]["schemas"]
    for action, ref in mapping.items():
        model = comps[ref.split("/")[-1]]
        assert model["properties"]["action"]["const"] == action
        assert {"ok", "action"} <= set(model["required"])


def test_each_answer_echoes_its_action_and_matches_the_schema_mapped_to_it(
        http: httpx.Client) -> None:
    """The wire keeps every field it had; ``action`` is added, and each answer validates
    against the model the discriminator maps its action to."""
    def act(**body: Any) -> dict[str, Any]:
        r = http.post("/api/autonomy", json=body)
        assert r.status_code == 200, r.text
        got: dict[str, Any] = r.json()
        assert got["action"] == body["action"]
        schemas.ACTION_ANSWER.validate_python(got)  # by the discriminator
        return got

    task = act(action="create", assignee="coder", title="t")["task"]
    lease = act(action="claim", assignee="coder", worker="w1")["lease"]
    act(action="heartbeat", taskId=task["id"], leaseToken=lease["token"])
    act(action="complete", taskId=task["id"], leaseToken=lease["token"],
        outcome="success")
    act(action="pause_lane", assignee="coder")
    assert act(action="resume_lane", assignee="coder")["wasPaused"] is True
    act(action="history", taskId=task["id"])
    act(action="status")
    act(action="tasks")
    act(action="fingerprint_count", fingerprint="coder:x")
