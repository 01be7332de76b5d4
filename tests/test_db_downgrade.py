"""``autonomy db downgrade`` is the one command that destroys data (SPEC 4.12): it needs an
explicit revision; to ``base``, or while leases are live, it refuses unless ``--force``,
naming what would be lost. Run as a real process on both databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app import ops
from app.settings import Settings
from app.storage import db
from app.storage.context import Context


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTONOMY_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DATABASE_URL=settings.database_url, REDIS_URL=settings.effective_redis_url,
               AUTONOMY_REDIS_PREFIX=settings.redis_prefix)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = db.make_engine(url)
    try:
        return db.current_revision(engine)
    finally:
        engine.dispose()


def _fill(settings: Settings, *, todo: int, leased: int) -> list[dict[str, Any]]:
    """``todo`` tasks queued and ``leased`` of them claimed (live leases); the claims."""
    ctx = Context.from_settings(settings)
    try:
        for i in range(todo):
            ops.dispatch(ctx, {"action": "create", "assignee": f"lane{i % max(1, leased)}",
                               "title": f"t{i}"})
        return [ops.dispatch(ctx, {"action": "claim", "assignee": f"lane{i}",
                                   "worker": f"w{i}"}) for i in range(leased)]
    finally:
        ctx.close()


def test_downgrade_without_a_revision_is_a_usage_error_and_drops_nothing(
        settings: Settings) -> None:
    before = _tables(settings.database_url)
    proc = _cli(settings, "db", "downgrade")
    assert proc.returncode == 2, proc.stderr
    assert ("error: invalid_input: db downgrade needs an explicit revision (there is no "
            "default)") in proc.stderr, proc.stderr
    assert _tables(settings.database_url) == before and "task" in before


@pytest.mark.slow
def test_downgrade_to_base_is_refused_naming_what_would_be_lost_until_forced(
        settings: Settings) -> None:
    _fill(settings, todo=5, leased=0)
    proc = _cli(settings, "db", "downgrade", "base")
    assert proc.returncode == 1, proc.stderr
    assert "error: downgrade_refused" in proc.stderr
    assert "it drops every table" in proc.stderr
    assert "5 unfinished tasks, 0 live leases, 5 events" in proc.stderr, proc.stderr
    assert "--force" in proc.stderr
    answer = json.loads(proc.stdout)  # piped: the JSON answer for scripts
    assert answer["error"] == "downgrade_refused" and answer["unfinishedTasks"] == 5
    assert "task" in _tables(settings.database_url)
    # -N that reaches base is the same downgrade
    assert _cli(settings, "db", "downgrade", "--", "-99").returncode == 1
    proc = _cli(settings, "db", "downgrade", "base", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "dropped what it held: 5 unfinished tasks" in proc.stderr
    assert _tables(settings.database_url) == set()


@pytest.mark.slow
def test_downgrade_while_leases_are_live_is_refused_until_they_end_or_forced(
        settings: Settings) -> None:
    claims = _fill(settings, todo=4, leased=2)
    assert all(c["lease"]["token"] for c in claims)
    head = _revision(settings.database_url)
    proc = _cli(settings, "db", "downgrade", "--", "-1")
    assert proc.returncode == 1, proc.stderr
    assert "error: downgrade_refused" in proc.stderr
    assert "2 leases are live" in proc.stderr and "4 unfinished tasks" in proc.stderr
    assert _revision(settings.database_url) == head
    ctx = Context.from_settings(settings)
    try:  # the workers finish: no live lease is left
        for c in claims:
            ops.dispatch(ctx, {"action": "complete", "taskId": c["task"]["id"],
                               "leaseToken": c["lease"]["token"], "outcome": "success"})
    finally:
        ctx.close()
    proc = _cli(settings, "db", "downgrade", "--", "-1")
    assert proc.returncode == 0, proc.stderr
    assert _revision(settings.database_url) != head
    assert _cli(settings, "db", "upgrade").returncode == 0
    _fill(settings, todo=1, leased=1)
    assert _cli(settings, "db", "downgrade", "--", "-1").returncode == 1
    assert _cli(settings, "db", "downgrade", "--force", "--", "-1").returncode == 0


def test_downgrade_to_an_unknown_revision_is_bad_input(settings: Settings,
                                                       tmp_path: Path) -> None:
    proc = _cli(settings, "db", "downgrade", "nosuch")
    assert proc.returncode == 2 and "error: invalid_input" in proc.stderr, proc.stderr
    assert "nosuch" in proc.stderr
