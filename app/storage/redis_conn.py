"""Redis clients and the health of the fast path (``RedisHealth``: degraded while Redis is
down, stalled or refusing). Which redis-py errors mean "unavailable", and their
translation at the boundary (``redis_errors``), live in ``app.storage.redis_errors``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry
from redis.sentinel import Sentinel

from app.redis_url import is_sentinel, parse_sentinel
from app.storage.redis_errors import is_timeout, redis_errors

__all__ = [
    "RedisHealth", "close_client", "from_url", "make_fast_redis", "make_redis", "redis_errors",
]

log = logging.getLogger(__name__)


def make_redis(url: str, *, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client that answers ``str`` (decoded UTF-8). A ``redis+sentinel://`` URL gives
    a client of the primary its sentinels name (``from_url``)."""
    return from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                    socket_connect_timeout=socket_timeout_s, health_check_interval=30)


def from_url(url: str, **kwargs: Any) -> redis.Redis:
    """``redis.Redis.from_url`` that also takes ``redis+sentinel://`` (``app.redis_url``).

    A Sentinel client's pool (redis-py's ``SentinelConnectionPool``) asks the sentinels
    for the primary's address on each new connection, and drops a connection whose
    server answers that it is a replica now (``READONLY``): after a failover the next
    call after a failed one reaches the promoted replica, with no restart. The sentinels
    are asked with the same deadlines as the data connections."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel(url)
    # the sentinels get the data connections' deadlines and retries: the fast path's
    # lookup of the primary costs one deadline too
    asking: dict[str, Any] = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout",
                                                     "retry") if k in kwargs}
    sentinel = Sentinel(list(target.sentinels),
                        sentinel_kwargs={**asking, **target.sentinel_kwargs()})
    client: redis.Redis = sentinel.master_for(
        target.master_name, db=target.db, username=target.username,
        password=target.password, **kwargs)
    return client


def close_client(client: redis.Redis) -> None:
    """Close ``client``'s connections, and a Sentinel client's connections to its
    sentinels (they are the pool's, not the client's)."""
    client.close()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for s in getattr(manager, "sentinels", ()):
        s.close()


def make_fast_redis(url: str, *, timeout_s: float) -> redis.Redis:
    """A client for the fast path: its own pool, a short socket deadline and no retries,
    so a down or stalled Redis costs one deadline, never a longer timeout times retries.

    Built from the URL with redis-py's maintenance notifications off, not from another
    client's pool settings (those carry that pool's notification handler and its
    "original" timeouts, which are not the fast path's)."""
    return from_url(
        url, decode_responses=True, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        maint_notifications_config=MaintNotificationsConfig(enabled=False))


class RedisHealth:
    """Is Redis usable for the fast path, as this process last saw it.

    A failure marks Redis *degraded*: the fast path is skipped (the database answers
    alone) until a re-probe is due, ``first_ms`` after the first failure, doubling up to
    ``max_ms`` while Redis stays away, so a fleet in an outage does not hammer it with
    reconnects. The first success clears it. Thread-safe; one per context.

    A refusal (connection refused, an error reply such as ``OOM``) degrades at once. A
    missed deadline degrades only after ``misses`` of them in a row with no answer in
    between: a busy but healthy Redis that answers one call late (a machine under load)
    costs that call its fast path, not the fleet's (issue 22). A stalled Redis misses
    every call, so it is degraded after ``misses`` deadlines (well under a second at the
    default 250 ms x 2).
    """

    def __init__(self, *, first_ms: int, max_ms: int, misses: int = 1) -> None:
        self.first_s, self.max_s = first_ms / 1000, max(first_ms, max_ms) / 1000
        self.misses_to_degrade = max(1, misses)
        self._lock = threading.Lock()
        self.degraded = False
        self.since: float | None = None  # time.time() of the first failure of this episode
        self._delay_s = 0.0
        self._probe_at = 0.0
        self._misses = 0  # deadlines missed in a row while not degraded

    def usable(self) -> bool:
        """True when the fast path may try Redis: healthy, or a re-probe is due (only one
        caller gets each re-probe; the others skip Redis until it answers)."""
        if not self.degraded:
            return True
        with self._lock:
            now = time.monotonic()
            if not self.degraded or now >= self._probe_at:
                self._probe_at = now + self._delay_s  # one probe per period
                return True
        return False

    def failed(self, err: Exception) -> None:
        """Redis erred or timed out: degraded (a timeout only after ``misses`` in a row),
        the next probe after a longer wait."""
        with self._lock:
            if not self.degraded and is_timeout(err):
                self._misses += 1
                if self._misses < self.misses_to_degrade:
                    log.info("redis missed a deadline (%d of %d before degraded): %s",
                             self._misses, self.misses_to_degrade, err)
                    return
            first = not self.degraded
            self._delay_s = self.first_s if first else min(self.max_s, self._delay_s * 2)
            self._probe_at = time.monotonic() + self._delay_s
            self.degraded = True
            self._misses = 0
            if first:
                self.since = time.time()
        if first:
            log.warning("redis degraded (the database answers alone; re-probing with "
                        "backoff): %s", err)

    def ok(self) -> None:
        """Redis answered: healthy again."""
        if self._misses:
            self._misses = 0
        if not self.degraded:
            return
        with self._lock:
            was, self.degraded, self.since, self._delay_s = self.degraded, False, None, 0.0
        if was:
            log.warning("redis answers again: fast path back on")
