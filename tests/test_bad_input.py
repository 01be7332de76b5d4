"""Bad input and unreachable services: a clear error with a stable code, data unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from app import ops
from app.clock import FrozenClock
from app.errors import AutonomyError, DatabaseUnavailable, RedisUnavailable
from app.ops import lanes
from app.ops.checks import jobs
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import free_port
from tests.test_lanes import snapshot


@pytest.fixture
def seeded(ctx: Context) -> Iterator[tuple[Context, dict[str, Any]]]:
    lanes.create(ctx, assignee="coder", title="a", payload={"k": 1})
    lanes.create(ctx, assignee="coder", title="b")
    claimed = lanes.claim(ctx, assignee="coder", worker="w1")
    yield ctx, claimed


BAD_REQUESTS = [
    ({"action": "complete", "taskId": 4242, "leaseToken": "0" * 32, "outcome": "success"},
     "task_not_found"),
    ({"action": "heartbeat", "taskId": 4242, "leaseToken": "0" * 32}, "task_not_found"),
    ({"action": "history", "taskId": 4242}, "task_not_found"),
    ({"action": "create", "assignee": "", "title": "t"}, "invalid_assignee"),
    ({"action": "create", "assignee": "   ", "title": "t"}, "invalid_assignee"),
    ({"action": "create", "assignee": "x" * 65, "title": "t"}, "invalid_assignee"),
    ({"action": "create", "assignee": "bad lane!", "title": "t"}, "invalid_assignee"),
    ({"action": "create", "assignee": 7, "title": "t"}, "invalid_assignee"),
    ({"action": "claim", "assignee": "", "worker": "w1"}, "invalid_assignee"),
    ({"action": "claim", "assignee": "coder", "worker": ""}, "invalid_worker"),
    ({"action": "create", "assignee": "coder", "title": ""}, "invalid_title"),
    ({"action": "create", "assignee": "coder", "title": "t", "payload": "{not json"},
     "invalid_payload"),
    ({"action": "create", "assignee": "coder", "title": "t", "payload": [1, 2]},
     "invalid_payload"),
    ({"action": "create", "assignee": "coder", "title": "t", "payload": {"x": "y" * 70000}},
     "invalid_payload"),
    ({"action": "create", "assignee": "coder", "title": "t", "priority": "high"},
     "invalid_input"),
    ({"action": "complete", "taskId": 1, "leaseToken": "0" * 32, "outcome": "maybe"},
     "invalid_outcome"),
    ({"action": "complete", "taskId": 1, "leaseToken": "0" * 32, "outcome": "failure"},
     "invalid_reason"),
    ({"action": "complete", "taskId": 1, "leaseToken": "nope", "outcome": "success"},
     "invalid_lease_token"),
    ({"action": "complete", "taskId": "abc", "leaseToken": "0" * 32, "outcome": "success"},
     "invalid_input"),
    ({"action": "complete", "taskId": -3, "leaseToken": "0" * 32, "outcome": "success"},
     "invalid_input"),
    ({"action": "fingerprint_count", "fingerprint": ""}, "invalid_input"),
    ({"action": "fingerprint_count", "fingerprint": "a:b", "windowHours": -1}, "invalid_input"),
    ({"action": "configure_lane", "assignee": "coder", "maxInFlight": 0}, "invalid_input"),
    ({"action": "history"}, "invalid_input"),
    ({"action": "teleport"}, "invalid_action"),
    ({}, "invalid_action"),
]


@pytest.mark.parametrize(("request_", "code"), BAD_REQUESTS,
                         ids=[f"{r.get('action')}-{c}-{i}"
                              for i, (r, c) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_stable_code_and_changes_nothing(
        seeded: tuple[Context, dict[str, Any]], request_: dict[str, Any], code: str) -> None:
    ctx, _ = seeded
    before = snapshot(ctx)
    with pytest.raises(AutonomyError) as err:
        ops.dispatch(ctx, request_)
    wire = err.value.to_wire()
    assert wire["ok"] is False and wire["error"] == code, wire
    assert wire["message"]
    assert 400 <= err.value.http_status < 500
    assert snapshot(ctx) == before


def test_an_unreachable_database_is_database_unavailable(redis_server_url: str,
                                                          redis_prefix: str) -> None:
    port = free_port()
    s = make_settings(f"postgresql://postgres@127.0.0.1:{port}/nope", redis_server_url,
                      redis_prefix, db_connect_timeout_s=1)
    ctx = Context.from_settings(s)
    try:
        for call in (lambda: lanes.create(ctx, assignee="coder", title="t"),
                     lambda: lanes.claim(ctx, assignee="coder", worker="w1")):
            with pytest.raises(DatabaseUnavailable) as err:
                call()
            assert err.value.code == "database_unavailable" and err.value.http_status == 503
    finally:
        ctx.close()


def test_redis_down_refuses_a_run_lock_and_changes_nothing(sqlite_url: str, clock: FrozenClock,
                                                            redis_server_url: str,
                                                            redis_prefix: str) -> None:
    """Run-locks live in Redis alone: without it a check run is refused (a claim is not:
    the database answers it alone, tests/test_redis_degraded.py)."""
    live = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix),
                                 clock=clock)
    lanes.create(live, assignee="coder", title="t")
    before = snapshot(live)
    down = Context.from_settings(
        make_settings(sqlite_url, f"redis://127.0.0.1:{free_port()}/0", redis_prefix,
                      redis_socket_timeout_s=1), clock=clock)
    try:
        with pytest.raises(RedisUnavailable) as err:
            jobs.run_job(down, "handoff_health", holder="t")
        assert err.value.to_wire()["error"] == "redis_unavailable"
        assert snapshot(live) == before
    finally:
        down.close()
        live.close()


def test_a_complete_still_lands_when_redis_is_down(sqlite_url: str, clock: FrozenClock,
                                                   redis_server_url: str,
                                                   redis_prefix: str) -> None:
    """The database is the authority: finished work is not thrown away for a Redis blip."""
    live = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix),
                                 clock=clock)
    lanes.create(live, assignee="coder", title="t")
    c = lanes.claim(live, assignee="coder", worker="w1")
    down = Context.from_settings(
        make_settings(sqlite_url, f"redis://127.0.0.1:{free_port()}/0", redis_prefix,
                      redis_socket_timeout_s=1), clock=clock)
    try:
        done = lanes.complete(down, task_id=c["task"]["id"], lease_token=c["lease"]["token"],
                              outcome="success")
        assert done["task"]["status"] == "done"
        # the stale Redis lease left behind does not block the lane: the DB confirms it
        lanes.create(live, assignee="coder", title="next")
        nxt = lanes.claim(live, assignee="coder", worker="w1")
        assert nxt["task"]["title"] == "next" and "guard" not in nxt
    finally:
        down.close()
        live.close()


def test_a_database_without_the_schema_says_to_migrate(ctx: Context) -> None:
    from app.storage import db

    db.downgrade(ctx.settings.database_url, "base")
    ctx.engine.dispose()
    with pytest.raises(AutonomyError) as err:
        lanes.create(ctx, assignee="coder", title="t")
    assert err.value.code == "database_not_migrated" and err.value.http_status == 503
