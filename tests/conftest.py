"""Shared fixtures: real Redis and PostgreSQL (see ``tests/servers.py``), a frozen clock,
a migrated database per test, and a ``ctx`` parametrised over SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy as sa

from app.clock import FrozenClock
from app.settings import Settings
from app.storage import db
from app.storage.context import Context
from app.storage.redis_conn import make_redis
from tests.servers import (
    OWNED_BY_BROADER_SCOPE,
    ThrowawayPostgres,
    ThrowawayRedis,
    unique_name,
    with_database,
)

# --- no test leaves a process behind -------------------------------------------------

CHILD_EXIT_GRACE_S = 10.0
# multiprocessing's resource tracker lives as long as the session, by design; so does a
# worker process's command watchdog (app.workers.command: one per process, ended at exit)
LONG_LIVED_HELPERS = ("multiprocessing.resource_tracker", "autonomy command watchdog")


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline())[:300]}"
    except psutil.Error:
        return f"pid {p.pid}"


@pytest.fixture(autouse=True)
def no_process_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a child process of its own running after its teardown.

    Fixtures of a broader scope are set up before this one and torn down after it, so
    what they started (and what those processes start) is in ``before`` and left alone;
    so is a process a module's fixture owns (``tests.servers.owned_by_broader_scope``).
    A child still exiting gets ``CHILD_EXIT_GRACE_S``; one still running after that is
    killed (the next tests must not inherit it) and the test fails naming it."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def left() -> list[psutil.Process]:
        out = []
        for child in me.children(recursive=False):
            if child.pid in before or child.pid in OWNED_BY_BROADER_SCOPE:
                continue
            tree = [child, *child.children(recursive=True)]
            for p in tree:
                if not _running(p):
                    continue
                with contextlib.suppress(psutil.Error):
                    if any(h in " ".join(p.cmdline()) for h in LONG_LIVED_HELPERS):
                        before.add(p.pid)
                        continue
                out.append(p)
        return out

    deadline = time.monotonic() + CHILD_EXIT_GRACE_S
    alive = left()
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = left()
    if not alive:
        return
    names = [_describe(p) for p in alive]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    pytest.fail(f"{request.node.nodeid} left {len(names)} process(es) running after its "
                "teardown:\n" + "\n".join(names), pytrace=False)


# --- servers (session) --------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of a real Redis: TEST_REDIS_URL, or a throwaway redis-server."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        redis.Redis.from_url(url).ping()  # fail loudly, never skip
        yield url
        return
    server = ThrowawayRedis()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL (admin database) of a real PostgreSQL: TEST_DATABASE_URL, or an embedded one."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield db.normalise_url(url)
        return
    server = ThrowawayPostgres()
    yield db.normalise_url(server.url)
    server.stop()


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> Iterator[str]:
    """A migrated template database; each test copies it (fast) instead of migrating."""
    name = unique_name("autonomy_tmpl")
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db.upgrade(with_database(pg_server_url, name))
    yield name
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    db.upgrade(f"sqlite:///{path}")
    return path


# --- per test -------------------------------------------------------------------------


@pytest.fixture
def pg_url(pg_server_url: str, pg_template: str) -> Iterator[str]:
    """A fresh migrated PostgreSQL database of this test's own, dropped afterwards."""
    name = unique_name("autonomy_test")
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield with_database(pg_server_url, name)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh migrated SQLite file of this test's own."""
    path = tmp_path / "autonomy.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def redis_prefix(redis_server_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_server_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_client(redis_server_url: str) -> Iterator[redis.Redis]:
    client = make_redis(redis_server_url)
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    """A redis-server of this test's own, to stop, stall (SIGSTOP) or kill: never the
    shared one. Left running (SIGCONT) before it is stopped."""
    server = ThrowawayRedis()
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


def make_settings(database_url: str, redis_url: str, prefix: str, **overrides: object) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, redis_prefix=prefix,
                    **overrides)  # type: ignore[arg-type]


# the PostgreSQL run of a test that runs on both is its "twin": `make test-fast` runs the
# SQLite one only (PostgreSQL-only tests still run there)
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres,
                                                                  pytest.mark.postgres_twin])])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """A migrated database URL for the parametrised backend."""
    name = "pg_url" if backend == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def settings(database_url: str, redis_server_url: str, redis_prefix: str) -> Settings:
    return make_settings(database_url, redis_server_url, redis_prefix)


@pytest.fixture
def ctx(settings: Settings, clock: FrozenClock) -> Iterator[Context]:
    """A Context on a fresh database (SQLite and PostgreSQL) with a frozen clock."""
    c = Context.from_settings(settings, clock=clock)
    yield c
    c.close()
