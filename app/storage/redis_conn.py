"""Redis clients, and the translation of redis-py errors at the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from app.errors import RedisUnavailable


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
