"""A database belongs to one deployment (SPEC 4.12): the first process binds it to its
Redis and key prefix; a process pointed at it with another Redis or prefix is refused at
start, naming both; ``autonomy db bind-deployment --force`` re-binds it. Real processes,
on both databases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.ops.deployment import redis_identity
from app.settings import Settings
from tests.servers import ThrowawayRedis, free_port
from tests.test_up import READY, Proc, assert_all_gone, base_env, run_cli

HOST = socket.gethostname()


def _env(settings: Settings, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTONOMY_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DATABASE_URL=settings.database_url, REDIS_URL=redis_url,
               AUTONOMY_REDIS_PREFIX=prefix, AUTONOMY_CELERY_QUEUE=f"q-{prefix}",
               PYTHONUNBUFFERED="1", **extra)
    return env


def _bind(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "db", "bind-deployment", *extra],
                          env=env, capture_output=True, text=True, timeout=60)


def _exits(argv: list[str], env: dict[str, str], timeout_s: float = 60) -> tuple[int, str]:
    """Run a process that must stop by itself; killed (its group) with a diagnosis if not."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{argv} still running after {timeout_s}s; output:\n{out}") \
            from None
    return proc.returncode, out


def test_a_redis_identity_is_host_port_db_without_the_password() -> None:
    assert redis_identity("redis://:secret@redis:6379/0") == "redis:6379/0"
    assert redis_identity("rediss://user:pw@Cache.Example:6380/2?ssl_cert_reqs=none") \
        == "cache.example:6380/2"
    assert redis_identity("redis://redis") == "redis:6379/0"
    # two machines' local Redis are two Redis
    assert redis_identity("redis://127.0.0.1:6379/0") == f"{HOST}/127.0.0.1:6379/0"
    assert redis_identity("redis://localhost:7000/1") == f"{HOST}/localhost:7000/1"
    assert redis_identity("unix:///run/redis.sock?db=3") == f"{HOST}/unix:/run/redis.sock/3"


CELERY = [sys.executable, "-m", "celery", "-A", "app.celery_app", "--quiet"]
ROLES = {
    "api": [sys.executable, "-m", "app.cli", "serve", "--port", "0"],
    "celery worker": [*CELERY, "worker", "--loglevel", "INFO", "--without-gossip"],
    "beat": [*CELERY, "beat", "--loglevel", "INFO", "--schedule"],  # + a file of the test's
    "autonomy worker": [sys.executable, "-m", "app.cli", "worker", "--lane", "coder", "--",
                        "true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("role", list(ROLES))
def test_a_process_pointed_at_another_deployments_database_is_refused_naming_both(
        settings: Settings, redis_server_url: str, redis_prefix: str, role: str,
        tmp_path: Path) -> None:
    """Bound to (the shared Redis, this test's prefix): the same Redis with another prefix,
    and another Redis with the same prefix, are both refused at start (exit 1), before
    they write anything; the message names both deployments and the re-bind command."""
    assert _bind(_env(settings, redis_server_url, redis_prefix)).returncode == 0
    other_prefix = f"test:{uuid.uuid4().hex[:12]}:"
    theirs = ThrowawayRedis()
    try:
        for url, prefix in ((redis_server_url, other_prefix), (theirs.url, redis_prefix)):
            argv = [*ROLES[role], *([str(tmp_path / "schedule")] if role == "beat" else [])]
            code, out = _exits(argv, _env(settings, url, prefix))
            assert code == 1, out
            assert "deployment_mismatch" in out, out
            assert (f"it is bound to Redis {redis_identity(redis_server_url)} with key prefix "
                    f"{redis_prefix!r}") in out, out
            assert (f"this {role} is pointed at Redis {redis_identity(url)} with key prefix "
                    f"{prefix!r}") in out, out
            assert "autonomy db bind-deployment --force" in out
            assert "Traceback" not in out, out
        import redis

        client = redis.Redis.from_url(theirs.url)
        assert client.dbsize() == 0  # refused before it wrote anything there
        client.close()
    finally:
        theirs.stop()


@pytest.mark.slow
def test_bind_deployment_rebinds_only_with_force_and_then_the_old_deployment_is_refused(
        settings: Settings, redis_server_url: str, redis_prefix: str) -> None:
    old = _env(settings, redis_server_url, redis_prefix)
    new = _env(settings, redis_server_url, redis_prefix + "moved:")
    shown = subprocess.run([sys.executable, "-m", "app.cli", "db", "deployment"], env=old,
                           capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["boundTo"] is None  # nothing bound yet
    assert _bind(old).returncode == 0
    assert _bind(old).returncode == 0  # the same deployment again: nothing to force
    refused = _bind(new)
    assert refused.returncode == 1 and "error: deployment_mismatch" in refused.stderr
    moved = _bind(new, "--force")
    assert moved.returncode == 0, moved.stderr
    answer = json.loads(moved.stdout)
    assert answer["changed"] is True and answer["previous"]["prefix"] == redis_prefix
    assert answer["boundTo"]["prefix"] == redis_prefix + "moved:"
    assert _bind(old).returncode == 1  # the old deployment is now the other one


@pytest.mark.slow
def test_racing_first_binders_make_exactly_one_winner(settings: Settings,
                                                      redis_server_url: str) -> None:
    """Eight processes, each its own prefix, bind one unbound database at once: one wins,
    the seven others are refused naming the winner's prefix."""
    envs = [_env(settings, redis_server_url, f"race{i}:") for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-m", "app.cli", "db", "bind-deployment"],
                              env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for e in envs]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    winners = [json.loads(out)["boundTo"]["prefix"] for code, out, _ in results if code == 0]
    assert len(winners) == 1, results
    losers = [err for code, _, err in results if code != 0]
    assert len(losers) == 7 and all(
        "deployment_mismatch" in err and f"key prefix {winners[0]!r}" in err
        for err in losers), losers


# --- autonomy up ------------------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test started; anything still alive at the end is killed (by pid)."""
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            for child in p.descendants():
                child.kill()
            p.proc.kill()
            p.proc.wait()


def _up(procs: list[Proc], tmp_path: Path, data: str, port: int) -> Proc:
    env = base_env(tmp_path, AUTONOMY_LOCAL_REDIS_PROBE_URL=f"redis://127.0.0.1:{free_port()}/0")
    env["AUTONOMY_DATA_DIR"] = str(tmp_path / data)
    return run_cli(procs, env, tmp_path, "up", "--no-flower", "--port", str(port))


@pytest.mark.slow
def test_up_twice_in_a_row_works_and_a_second_up_with_its_own_redis_is_refused(
        tmp_path: Path, procs: list[Proc]) -> None:
    """``make run`` twice: the second start reuses its data directory's Redis port, so it
    is the same deployment. Another ``up`` on the same database from another data
    directory (its own embedded Redis) is refused before it starts anything."""
    first = _up(procs, tmp_path, "data", free_port())
    first.wait_for(READY)
    url = first.wait_for("autonomy up: redis ").split()[3]
    assert first.stop(signal.SIGINT) == 0
    # the API's port must not be the one the data directory's Redis comes back on: the
    # OS may hand out that port again once the first Redis has let it go (it did, at load
    # ~30: "[Errno 98] ... address already in use", issue 24)
    redis_port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    api_port = next(p for p in iter(free_port, None) if p != redis_port)
    # asked for that port, up refuses at once, naming the clash (it said "api exited
    # (code 3) before it was ready" once its Redis had taken the port)
    clash = _up(procs, tmp_path, "data", redis_port)
    assert clash.proc.wait(timeout=90) == 2, clash.output
    clash.stop()
    error = next(ln for ln in clash.lines if "error" in ln)
    assert "port_in_use" in error and f"port {redis_port}, the embedded Redis's port" in error \
        and "--redis-port" in error, error
    assert READY not in clash.output
    again = _up(procs, tmp_path, "data", api_port)
    again.wait_for(READY)
    assert again.wait_for("autonomy up: redis ").split()[3] == url
    other = _up(procs, tmp_path, "elsewhere", free_port())
    assert other.proc.wait(timeout=90) == 1, other.output
    other.stop()
    errors = [ln for ln in other.lines if "error" in ln]
    assert len(errors) == 1 and "deployment_mismatch" in errors[0], other.output
    host_port = url.split("//")[1].rsplit("/", 1)[0]
    assert f"bound to Redis {HOST}/{host_port}/0" in errors[0], errors[0]
    assert "this autonomy up is pointed at Redis" in errors[0]
    assert READY not in other.output
    assert not (tmp_path / "elsewhere" / "redis").exists()  # its Redis never started
    children = [c.pid for c in again.descendants()]
    assert again.stop(signal.SIGINT) == 0
    assert_all_gone(children)
    # the port of the last start is taken by something else: up says so, not only "mismatch"
    port = int(host_port.rsplit(":", 1)[1])
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        moved = _up(procs, tmp_path, "data", free_port())
        assert moved.proc.wait(timeout=90) == 1, moved.output
        moved.stop()
    error = next(ln for ln in moved.lines if "error" in ln)
    assert "deployment_mismatch" in error
    assert (f"the embedded Redis's port of the last start, {port}, is taken by another "
            "process") in error and f"--redis-port {port}" in error, error
    assert not [c for c in psutil.Process().children(recursive=True)
                if "redis-server" in " ".join(c.cmdline())]


def test_a_process_starting_before_the_migrations_waits_for_them_then_binds(
        tmp_path: Path, redis_server_url: str, redis_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A Kubernetes pod may start while the migrate Job still runs: the check says why it
    cannot tell yet and tries again with backoff (never silent, never a crash)."""
    from app.ops import deployment
    from app.storage import db

    url = f"sqlite:///{tmp_path / 'late.db'}"
    settings = Settings(database_url=url, redis_url=redis_server_url, redis_prefix=redis_prefix)
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 2:  # the migrate job finishes during the second wait
            db.upgrade(url)

    with caplog.at_level("WARNING", logger="app.ops.deployment"):
        found = deployment.check_at_start(settings, "beat", sleep=sleep)
    assert waits == [0.5, 1.0]
    assert found.redis_prefix == redis_prefix and found.bound_by.startswith("beat@")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("database_not_migrated" in m for m in said), said


@pytest.mark.postgres
@pytest.mark.slow
def test_an_api_started_while_the_database_is_away_serves_then_stops_on_a_mismatch(
        pg_server_url: str, pg_template: str, redis_server_url: str, redis_prefix: str,
        tmp_path: Path) -> None:
    """Its database does not exist yet: the API serves (/livez 200, /readyz 503 naming the
    database) and checks again in the background. The database then appears -- bound to
    another prefix (made aside, then renamed into place in one step) -- and the API stops,
    exit 1, naming both deployments."""
    import httpx
    import sqlalchemy as sa

    from tests.servers import unique_name, with_database

    target, aside = unique_name("autonomy_late"), unique_name("autonomy_aside")
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    settings = Settings(database_url=with_database(pg_server_url, target),
                        redis_url=redis_server_url, redis_prefix=redis_prefix)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                env=_env(settings, redis_server_url, redis_prefix),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"{base}/livez", timeout=5).status_code == 200
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    log.read_text()
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["failed"] == ["database"]
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{aside}" TEMPLATE "{pg_template}"')
        other = Settings(database_url=with_database(pg_server_url, aside),
                         redis_url=redis_server_url, redis_prefix=redis_prefix + "other:")
        assert _bind(_env(other, redis_server_url, other.redis_prefix)).returncode == 0
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{aside}" RENAME TO "{target}"')
        assert proc.wait(timeout=90) == 1, log.read_text()
        text = log.read_text()
        assert "deployment_mismatch" in text and f"{redis_prefix + 'other:'!r}" in text, text
        assert f"this api is pointed at Redis {redis_identity(redis_server_url)} with key " \
               f"prefix {redis_prefix!r}" in text, text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with admin.connect() as c:
            for name in (target, aside):
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
