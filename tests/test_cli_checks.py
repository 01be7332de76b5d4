"""``autonomy check|status|incident|locks`` as a script and a person see them."""

from __future__ import annotations

import json

import pytest

from app.settings import Settings
from app.storage import locks
from app.storage.context import Context
from tests.test_cli import cli, cli_env, ok

__all__ = ["cli_env"]  # the fixture, shared with test_cli


@pytest.mark.slow
def test_each_check_runs_inline_under_its_run_lock(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    handoff = ok(cli_env, "check", "handoff")
    assert handoff["job"] == "handoff_health" and handoff["state"] == "GO"
    assert set(handoff["criteria"]) == {"cron", "queue", "ops"}
    assert ok(cli_env, "check", "readiness")["state"] == "GO"
    heal = ok(cli_env, "check", "self-heal")
    assert heal["requeued"] == [] and heal["runningLocks"][0]["job"] == "self_heal"
    assert heal["runningLocks"][0]["holder"].endswith(":cli")
    st = ok(cli_env, "check", "status")
    assert st["workflowHealth"]["runLocksCount"] == 1  # its own lock, while it ran
    jobs = ok(cli_env, "status")["workflowHealth"]["jobs"]
    assert all(jobs[j]["ok"] is True for j in ("handoff_health", "readiness", "self_heal"))


@pytest.mark.slow
def test_a_check_whose_lock_is_held_is_skipped(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    ctx = Context.from_settings(Settings(database_url=cli_env["DATABASE_URL"],
                                         redis_url=cli_env["REDIS_URL"],
                                         redis_prefix=cli_env["AUTONOMY_REDIS_PREFIX"]))
    try:
        token = locks.acquire(ctx, "readiness", budget_ms=60_000, holder="elsewhere:7:t")
        assert token
        skipped = ok(cli_env, "check", "readiness")
        assert skipped["skipped"] == "already_running" and skipped["holder"] == "elsewhere:7:t"
        listed = ok(cli_env, "locks")
        assert listed["runLocksCount"] == 1 and listed["runLocks"][0]["job"] == "readiness"
        assert listed["runLocks"][0]["holderAlive"] is True
    finally:
        ctx.close()


@pytest.mark.slow
def test_incident_set_writes_the_state_and_refuses_an_unknown_status(
        cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    set_ = ok(cli_env, "incident", "set", "critical", "--reason", "db failover")
    assert set_["opsIncident"]["status"] == "critical"
    inc = ok(cli_env, "status")["opsIncident"]
    assert inc["status"] == "critical" and inc["reason"] == "db failover"
    assert inc["stale"] is False and inc["writtenAt"]
    bad = cli(cli_env, "incident", "set", "on-fire")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"] == "invalid_input"
    assert ok(cli_env, "status")["opsIncident"]["status"] == "critical"  # unchanged


@pytest.mark.slow
def test_an_unknown_check_is_bad_input(cli_env: dict[str, str]) -> None:
    bad = cli(cli_env, "check", "everything")
    assert bad.returncode == 2 and "error: invalid_input" in bad.stderr


@pytest.mark.slow
def test_locks_shows_the_beat_leader_lease_apart_with_its_ttl(cli_env: dict[str, str]) -> None:
    from app.cli.checks import beat_line
    from app.storage import leader

    assert cli(cli_env, "db", "upgrade").returncode == 0
    ctx = Context.from_settings(Settings(database_url=cli_env["DATABASE_URL"],
                                         redis_url=cli_env["REDIS_URL"],
                                         redis_prefix=cli_env["AUTONOMY_REDIS_PREFIX"]))
    try:
        assert ok(cli_env, "locks")["beat"]["leader"] is None
        token, _ = leader.acquire(ctx, "b:1:beat")
        leader.stand_by(ctx, "b:2:beat")
        listed = ok(cli_env, "locks")
        assert listed["runLocks"] == [] and listed["beat"]["leader"] == "b:1:beat"
        assert listed["beat"]["standbys"] == ["b:2:beat"] and listed["beat"]["ttlMs"] == 10_000
        line = beat_line(listed["beat"])
        assert line.startswith("beat leader: b:1:beat since ") and "(TTL 10000 ms)" in line
        assert line.endswith("standbys: b:2:beat")
        assert token is not None
    finally:
        ctx.close()
