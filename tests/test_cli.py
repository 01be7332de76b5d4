"""The CLI as a script sees it: JSON on a pipe, exit 0 on ok, the error code on stderr."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def cli_env(tmp_path: Path, redis_server_url: str, redis_prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'cli.db'}", REDIS_URL=redis_server_url,
               AUTONOMY_REDIS_PREFIX=redis_prefix)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def ok(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = cli(env, *args)
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    assert answer["ok"] is True
    return answer


@pytest.mark.slow
def test_a_lane_scenario_through_the_cli(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    task = ok(cli_env, "create", "coder", "write the parser", "--priority", "2",
              "--payload", '{"repo": "x"}')["task"]
    assert task["payload"] == {"repo": "x"} and task["priority"] == 2
    claimed = ok(cli_env, "claim", "coder", "w1")
    assert claimed["task"]["id"] == task["id"]
    guard = ok(cli_env, "claim", "coder", "w2")
    assert guard["guard"] == "duplicate_claim_guard" and guard["leaseHolder"] == "w1"
    token = claimed["lease"]["token"]
    ok(cli_env, "heartbeat", str(task["id"]), token)
    done = ok(cli_env, "complete", str(task["id"]), token, "--result", '{"pr": 1}')
    assert done["task"]["status"] == "done"
    again = ok(cli_env, "complete", str(task["id"]), token)
    assert again["guard"] == "duplicate_complete_guard"
    paused = ok(cli_env, "pause", "coder", "--reason", "freeze", "--actor", "alice")
    assert paused["lane"]["paused"] is True
    refused = cli(cli_env, "claim", "coder", "w1")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"] == "lane_paused"
    assert "error: lane_paused" in refused.stderr
    ok(cli_env, "resume", "coder")
    events = ok(cli_env, "history", "--lane", "coder")["events"]
    assert {"lane_paused", "lane_resumed", "claim_guard"} <= {e["kind"] for e in events}
    count = ok(cli_env, "fingerprints", "coder:x")
    assert count["count"] == 0 and count["threshold"] == 3


@pytest.mark.slow
def test_cli_bad_input_exits_2_with_the_code_on_stderr(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    proc = cli(cli_env, "create", "coder", "t", "--payload", "{oops")
    assert proc.returncode == 2
    assert "error: invalid_payload" in proc.stderr
    proc = cli(cli_env, "complete", "1", "0" * 32, "--outcome", "perhaps")
    assert proc.returncode == 2 and "invalid_outcome" in proc.stderr
    proc = cli(cli_env, "complete", "99", "0" * 32)
    assert proc.returncode == 1 and "task_not_found" in proc.stderr


@pytest.mark.slow
def test_cli_db_downgrade_then_upgrade(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    assert cli(cli_env, "db", "downgrade", "base", "--force").returncode == 0
    proc = cli(cli_env, "create", "coder", "t")
    assert proc.returncode == 3 and "database_not_migrated" in proc.stderr, proc.stderr
    assert cli(cli_env, "db", "upgrade").returncode == 0
    ok(cli_env, "create", "coder", "t")


@pytest.mark.slow
def test_cli_unreachable_redis_exits_3_only_where_redis_is_the_answer(
        cli_env: dict[str, str]) -> None:
    """Run-locks live in Redis alone: ``locks`` cannot answer without it (exit 3); a claim
    is answered by the database alone (SPEC 4.7)."""
    from tests.servers import free_port

    assert cli(cli_env, "db", "upgrade").returncode == 0
    env = {**cli_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "AUTONOMY_REDIS_SOCKET_TIMEOUT_S": "1"}
    proc = cli(env, "locks")
    assert proc.returncode == 3 and "redis_unavailable" in proc.stderr
    ok(env, "create", "coder", "t")
    assert ok(env, "claim", "coder", "w1")["lease"]["token"]


@pytest.mark.slow
def test_cancel_and_requeue_from_the_cli_record_the_os_user_as_actor(
        cli_env: dict[str, str]) -> None:
    """The CLI on the database acts as an operator named after the OS user (SPEC 4.10);
    ``cancel`` and ``requeue`` recorded the caller-given ``cli`` instead."""
    user = f"cli:{getpass.getuser()}"
    assert cli(cli_env, "db", "upgrade").returncode == 0
    ok(cli_env, "lane", "coder", "--max-attempts", "1")
    doomed = ok(cli_env, "create", "coder", "queued by mistake")["task"]["id"]
    ok(cli_env, "cancel", str(doomed), "--actor", "ticket-OPS-7")
    failing = ok(cli_env, "create", "coder", "fails once")["task"]["id"]
    lease = ok(cli_env, "claim", "coder", "w1")["lease"]["token"]
    ok(cli_env, "complete", str(failing), lease, "--outcome", "failure", "--reason", "boom")
    ok(cli_env, "requeue", str(failing))
    events = {e["kind"]: e for t in (doomed, failing)
              for e in ok(cli_env, "history", "--task", str(t))["events"]}
    assert events["task_cancelled"]["actor"] == user
    assert events["task_cancelled"]["actorNote"] == "ticket-OPS-7"
    assert events["task_requeued"]["actor"] == user
    assert events["task_requeued"]["actorNote"] is None
