"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis strategies driven by
Hypothesis): well over 1,000 generated requests, schema-valid and schema-violating, against
a real server. No answer may be a 5xx, every answer must match what the schema documents,
and the database must be consistent afterwards.

The seed is fixed so CI is repeatable; set ``AUTONOMY_FUZZ_SEED`` to explore others.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.ops import lane_control, lanes
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import ServerThread
from tests.conftest import make_settings

TOKEN = "fuzz-token"
SEED = int(os.environ.get("AUTONOMY_FUZZ_SEED", "20251125"))
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
# (path, method, generation mode, max examples, poisoned): the action endpoint gets most;
# "poisoned" cases have lone surrogates and NUL put into their strings (SPEC 4.8)
PLAN = [
    ("/api/autonomy", "POST", GenerationMode.POSITIVE, 700, False),
    ("/api/autonomy", "POST", GenerationMode.NEGATIVE, 350, False),
    ("/api/autonomy", "POST", GenerationMode.POSITIVE, 300, True),
    ("/api/autonomy/tasks", "GET", GenerationMode.POSITIVE, 120, False),
    ("/api/autonomy/tasks", "GET", GenerationMode.NEGATIVE, 80, False),
    ("/api/autonomy/tasks", "GET", GenerationMode.POSITIVE, 40, True),
    ("/api/autonomy/status", "GET", GenerationMode.POSITIVE, 10, False),
    ("/metrics", "GET", GenerationMode.POSITIVE, 10, False),
]
# what a poisoned string gets: lone surrogates (high, low), NUL, or any of them mixed in
POISON = st.lists(st.one_of(st.integers(0xD800, 0xDFFF).map(chr), st.just("\x00"),
                            st.characters()), min_size=1, max_size=6).map("".join)
QUERY_POISON = st.lists(st.one_of(st.just("\x00"), st.characters()), min_size=1,
                        max_size=6).map("".join)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


class CountingSession(requests.Session):
    """A session that counts every answer by status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        resp = super().request(*args, **kwargs)
        self.statuses[resp.status_code] += 1
        if resp.headers.get("content-type", "").startswith("application/json"):
            body = resp.json()
            if isinstance(body, dict) and body.get("ok") is False:
                self.errors[str(body.get("error"))] += 1
        return resp


@pytest.fixture
def fuzz_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=TOKEN))
    # some real rows, so generated small task ids and lane names hit something
    for lane in ("a", "b", "coder"):
        for i in range(3):
            lanes.create(ctx, assignee=lane, title=f"{lane} {i}")
    lanes.claim(ctx, assignee="coder", worker="w1")
    lane_control.pause_lane(ctx, assignee="b", reason="fuzz", actor="fuzz")
    yield ctx
    ctx.close()


def inconsistencies(ctx: Context) -> list[str]:
    """Rows that break the store's invariants (empty when consistent)."""
    q = [
        ("in_progress without a full lease",
         "SELECT id FROM task WHERE status = 'in_progress' AND (lease_token IS NULL OR "
         "lease_expires_at IS NULL OR claimed_by IS NULL)"),
        ("not in progress but holding a lease",
         "SELECT id FROM task WHERE status <> 'in_progress' AND lease_token IS NOT NULL"),
        ("done without completed_at",
         "SELECT id FROM task WHERE status = 'done' AND completed_at IS NULL"),
        ("unknown status",
         "SELECT id FROM task WHERE status NOT IN ('todo', 'in_progress', 'done', 'cancelled')"),
        ("task without its lane row",
         "SELECT t.id FROM task t LEFT JOIN lane l ON l.assignee = t.assignee "
         "WHERE l.assignee IS NULL"),
        ("active task whose pause flag disagrees with its lane",
         "SELECT t.id FROM task t JOIN lane l ON l.assignee = t.assignee WHERE t.status IN "
         "('todo', 'in_progress') AND t.lane_paused <> l.paused"),
        ("paused lane without a paused_at",
         "SELECT assignee FROM lane WHERE paused = true AND paused_at IS NULL"),
        ("fingerprint log naming a missing task",
         "SELECT f.id FROM failure_fingerprint_log f LEFT JOIN task t ON t.id = f.task_id "
         "WHERE t.id IS NULL"),
        ("two open remediation tasks for one fingerprint",
         "SELECT failure_fingerprint FROM task WHERE kind = 'ops_remediation' AND status IN "
         "('todo', 'in_progress') GROUP BY failure_fingerprint HAVING count(*) > 1"),
        ("negative attempts", "SELECT id FROM task WHERE attempts < 0"),
    ]
    found = []
    with transaction(ctx.engine, write=False) as conn:
        for what, sql in q:
            rows = conn.execute(sa.text(sql)).all()
            if rows:
                found.append(f"{what}: {rows[:5]}")
        by_status = conn.execute(sa.text("SELECT count(*) FROM task GROUP BY status")).all()
        total = conn.execute(sa.text("SELECT count(*) FROM task")).scalar_one()
        if sum(n for (n,) in by_status) != total:
            found.append(f"status counts {by_status} do not add up to {total}")
    return found


@pytest.mark.slow
def test_over_a_thousand_generated_requests_get_no_5xx_and_leave_the_db_consistent(
        fuzz_ctx: Context) -> None:
    server = ServerThread(_app(fuzz_ctx)).start()
    session = CountingSession()
    try:
        raw = requests.get(f"{server.url}/openapi.json", timeout=10).json()
        schema = schemathesis.openapi.from_dict(raw)
        for path, method, mode, n, poisoned in PLAN:
            _fuzz(schema[path][method], mode, n, server.url, session, poisoned)
        # everything accepted can be answered: the whole task list reads back
        readback = requests.get(f"{server.url}/api/autonomy/tasks", params={"limit": 500},
                                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert readback.status_code == 200, readback.text
    finally:
        server.stop()
        session.close()
    total = sum(session.statuses.values())
    summary = {"seed": SEED, "requests": total,
               "byStatus": dict(sorted(session.statuses.items())),
               "byError": dict(session.errors.most_common())}
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "fuzz-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("fuzz summary:", json.dumps(summary))
    assert total >= 1300, summary
    assert not [s for s in session.statuses if s >= 500], summary
    assert session.statuses[200] > 0 and session.statuses[400] > 0, summary
    assert inconsistencies(fuzz_ctx) == []


def _app(ctx: Context) -> Any:
    from app.api.app import create_app

    return create_app(ctx=ctx)


@st.composite
def _poisoned(draw: Any, cases: Any) -> Any:
    """A case of ``cases`` with a poisoned string put into one of its string fields (body
    or query), at a random place of the value."""
    case = draw(cases)
    for part in ("body", "query"):
        fields = getattr(case, part, None)
        if not isinstance(fields, dict):
            continue
        keys = sorted(k for k, v in fields.items() if isinstance(v, str) and k != "action")
        if keys:
            key = draw(st.sampled_from(keys))
            value = fields[key]
            at = draw(st.integers(0, len(value)))
            # a URL carries UTF-8 only: a query gets NUL and odd text, a body everything
            fields[key] = value[:at] + draw(POISON if part == "body" else QUERY_POISON) \
                + value[at:]
    return case


def _fuzz(operation: Any, mode: GenerationMode, n: int, url: str,
          session: CountingSession, poisoned: bool = False) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    if poisoned:
        strategy = _poisoned(strategy)

    @seed(SEED)
    @settings(max_examples=n, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = case.call(base_url=url, session=session, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()
