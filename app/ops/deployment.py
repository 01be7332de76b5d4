"""A database belongs to one deployment (SPEC 4.12).

A deployment is a Redis and a key prefix: its Celery broker, run-locks, leases and beat
leader lease live there. Two stacks on one database with two Redis (or two prefixes)
would run two beat leaders and two sets of run-locks over one fleet, each blind to the
other's. So the database remembers the deployment it belongs to (``app.storage.deployment``)
and every long-running process -- API, Celery worker, beat, ``autonomy up``,
``autonomy worker`` on the local database -- checks it at start (``check``):

- an unbound database is bound by the first process that starts on it;
- a process whose Redis or prefix differs is refused (``DeploymentMismatch``, naming
  both) and exits non-zero: it cannot recover in place;
- ``autonomy db bind-deployment --force`` re-binds the database when the deployment
  really moved (a new Redis host), after its old processes are stopped.

A Redis is known by its **identity**: ``host:port/db`` from its URL, never the password
or the scheme's options (so a password rotation or TLS switch is the same Redis). A
loopback host is qualified with this machine's name (``myhost/127.0.0.1:6379/0``): two
machines' local Redis are two Redis. ``autonomy up``'s embedded Redis keeps its port
across starts from one data directory (``app.local.embedded_redis``), so its identity is
stable; two ``up`` from two data directories on one database are two deployments. A Redis
behind Sentinel (``redis+sentinel://``) is known by its master's name and sentinels, so a
failover that promotes a replica is the same deployment.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from app.clock import utcnow
from app.errors import DeploymentMismatch, Unavailable
from app.netaddr import is_loopback
from app.redis_url import is_sentinel, parse_sentinel
from app.settings import Settings
from app.storage import deployment as store
from app.storage.db import make_engine

log = logging.getLogger(__name__)

REBIND_COMMAND = "autonomy db bind-deployment --force"
# start-up waits for the database (down, or not migrated yet): first..max s, doubling
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 15.0


def redis_identity(url: str) -> str:
    """``host:port/db`` of a Redis URL (no password, no options); a loopback host or a
    unix socket qualified with this machine's name. A Sentinel URL's is its master's
    name, its sentinels (sorted) and database (``sentinel:mymaster@h1:26379,h2:26379/0``):
    a failover moves the primary, not the deployment."""
    if is_sentinel(url):
        target = parse_sentinel(url)
        hosts = []
        for host, port in sorted((h.lower(), p) for h, p in target.sentinels):
            where = f"[{host.lower()}]:{port}" if ":" in host else f"{host.lower()}:{port}"
            hosts.append(f"{socket.gethostname()}/{where}" if is_loopback(host) else where)
        return f"sentinel:{target.master_name}@{','.join(hosts)}/{target.db}"
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        db = query.get("db", ["0"])[0]
        return f"{socket.gethostname()}/unix:{parts.path}/{db}"
    host = (parts.hostname or "127.0.0.1").lower()
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    path = parts.path.strip("/")
    db = path if path.isdigit() else query.get("db", ["0"])[0]
    shown = f"[{host}]" if ":" in host else host
    where = f"{shown}:{port}/{db}"
    return f"{socket.gethostname()}/{where}" if is_loopback(host) else where


def wanted(settings: Settings, role: str) -> store.Binding:
    """The binding a process with ``settings`` belongs to (``role`` names it)."""
    return store.Binding(redis_identity(settings.effective_redis_url), settings.redis_prefix,
                         utcnow(), f"{role}@{socket.gethostname()}:{os.getpid()}")


def _describe(b: store.Binding) -> str:
    return f"Redis {b.redis_identity} with key prefix {b.redis_prefix!r}"


def check(settings: Settings, role: str) -> store.Binding:
    """Bind an unbound database to this process's deployment, or confirm it belongs to
    it; raises ``DeploymentMismatch`` naming both when it belongs to another, and
    ``Unavailable`` (database down, not migrated) when it cannot be told."""
    mine = wanted(settings, role)
    engine = make_engine(settings.database_url, connect_timeout_s=settings.db_connect_timeout_s,
                         busy_timeout_s=settings.db_busy_timeout_s)
    try:
        found = store.bind_if_unbound(engine, mine)
    finally:
        engine.dispose()
    if not found.same_deployment(mine):
        raise DeploymentMismatch(
            f"this database belongs to another deployment: it is bound to "
            f"{_describe(found)} (since {found.bound_at.isoformat(timespec='seconds')}, by "
            f"{found.bound_by}), but this {role} is pointed at {_describe(mine)}. Two "
            "deployments on one database would run two beat leaders and two sets of "
            "run-locks. Point it at that Redis and prefix (REDIS_URL, "
            f"AUTONOMY_REDIS_PREFIX), or, if the deployment really moved and its old "
            f"processes are stopped, re-bind the database: {REBIND_COMMAND}",
            boundTo={"redis": found.redis_identity, "prefix": found.redis_prefix},
            pointedAt={"redis": mine.redis_identity, "prefix": mine.redis_prefix})
    return found


def check_at_start(settings: Settings, role: str, *,
                   sleep: Callable[[float], None] = time.sleep) -> store.Binding:
    """``check`` for a process starting up: while the database cannot tell (down, or not
    migrated yet: a migrate job still running) it says so and tries again with backoff
    (SPEC 4.7: no process alive but silent); a mismatch is raised at once."""
    delay = RETRY_FIRST_S
    while True:
        try:
            return check(settings, role)
        except Unavailable as e:
            log.warning("%s: cannot check which deployment the database belongs to yet "
                        "(%s: %s); trying again in %gs", role, e.code, e.message, delay)
            sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)


def show(settings: Settings) -> dict[str, object]:
    """The database's binding and this process's deployment, as an answer."""
    engine = make_engine(settings.database_url)
    try:
        found = store.read(engine)
    finally:
        engine.dispose()
    mine = wanted(settings, "cli")
    return {"ok": True, "boundTo": _wire(found),
            "this": {"redis": mine.redis_identity, "prefix": mine.redis_prefix},
            "matches": found is not None and found.same_deployment(mine)}


def bind(settings: Settings, *, force: bool) -> dict[str, object]:
    """Bind the database to this process's deployment (``autonomy db bind-deployment``).
    An unbound database, or one bound to the same deployment, needs no ``force``; re-binding
    one that belongs to another deployment does (``DeploymentMismatch`` without it)."""
    mine = wanted(settings, "bind-deployment")
    if not force:
        found = check(settings, "bind-deployment")
        return {"ok": True, "boundTo": _wire(found), "previous": None, "changed": False}
    engine = make_engine(settings.database_url)
    try:
        previous = store.rebind(engine, mine)
    finally:
        engine.dispose()
    changed = previous is None or not previous.same_deployment(mine)
    if changed:
        log.warning("database re-bound from %s to %s",
                    _describe(previous) if previous else "nothing", _describe(mine))
    return {"ok": True, "boundTo": _wire(mine), "previous": _wire(previous),
            "changed": changed}


def _wire(b: store.Binding | None) -> dict[str, str] | None:
    if b is None:
        return None
    return {"redis": b.redis_identity, "prefix": b.redis_prefix,
            "boundAt": b.bound_at.isoformat(), "boundBy": b.bound_by}
