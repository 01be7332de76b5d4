"""Redis clients, the translation of redis-py errors at the boundary, and the health of the
fast path (``RedisHealth``: degraded while Redis is down or stalled)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.errors import RedisUnavailable

log = logging.getLogger(__name__)


def make_redis(url: str, *, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client that answers ``str`` (decoded UTF-8)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=30,
    )


def _safe(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@contextmanager
def redis_errors(client: redis.Redis) -> Iterator[None]:
    """Turn connection-level redis-py errors into ``RedisUnavailable``."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        kw = client.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        raise RedisUnavailable(f"Redis cannot be reached at {_safe(str(where))}: {e}") from e


def make_fast_redis(client: redis.Redis, *, timeout_s: float) -> redis.Redis:
    """A client to the same server as ``client`` for the fast path: its own small pool, a
    short socket deadline and no retries, so a down or stalled Redis costs one deadline,
    never the main client's longer timeout times its retries."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": timeout_s,
              "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0),
              "health_check_interval": 0}
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **kwargs))


class RedisHealth:
    """Is Redis usable for the fast path, as this process last saw it.

    A failure marks Redis *degraded*: the fast path is skipped (the database answers
    alone) until a re-probe is due, ``first_ms`` after the first failure, doubling up to
    ``max_ms`` while Redis stays away, so a fleet in an outage does not hammer it with
    reconnects. The first success clears it. Thread-safe; one per context.
    """

    def __init__(self, *, first_ms: int, max_ms: int) -> None:
        self.first_s, self.max_s = first_ms / 1000, max(first_ms, max_ms) / 1000
        self._lock = threading.Lock()
        self.degraded = False
        self.since: float | None = None  # time.time() of the first failure of this episode
        self._delay_s = 0.0
        self._probe_at = 0.0

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
        """Redis erred or timed out: degraded, the next probe after a longer wait."""
        with self._lock:
            first = not self.degraded
            self._delay_s = self.first_s if first else min(self.max_s, self._delay_s * 2)
            self._probe_at = time.monotonic() + self._delay_s
            self.degraded = True
            if first:
                self.since = time.time()
        if first:
            log.warning("redis degraded (the database answers alone; re-probing with "
                        "backoff): %s", err)

    def ok(self) -> None:
        """Redis answered: healthy again."""
        if not self.degraded:
            return
        with self._lock:
            was, self.degraded, self.since, self._delay_s = self.degraded, False, None, 0.0
        if was:
            log.warning("redis answers again: fast path back on")
