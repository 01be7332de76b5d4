"""The context every operation runs in: settings, engine, Redis, keys and a clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import redis
from redis import Redis
from sqlalchemy.engine import Connection, Engine

from app.clock import Clock, to_ms, utcnow
from app.settings import Settings, get_settings
from app.storage import store
from app.storage.db import make_engine, transaction
from app.storage.redis_conn import RedisHealth, make_fast_redis, make_redis
from app.storage.redis_keys import Keys


@dataclass
class Context:
    """What an operation needs; adapters build one and pass it in."""

    settings: Settings
    engine: Engine
    redis: redis.Redis
    clock: Clock = field(default=utcnow)

    def pinned_now(self) -> datetime | None:
        """The injected clock's time when a test injected one (``Context(clock=...)``):
        it then decides the time rules, so they are tested without sleeping. None in
        production: the database's clock decides (SPEC 4.9, ``now_in``)."""
        return None if self.clock is utcnow else self.clock()

    def redis_now_arg(self) -> int | str:
        """What a Redis script is given for "now" (``app.storage.redis_scripts.NOW_MS``):
        ``""`` in production -- the script reads Redis's own clock (``TIME``), so no
        caller's clock decides a time on the Redis side (SPEC 4.9) -- or a test's injected
        clock in epoch ms (``pinned_now``)."""
        pinned = self.pinned_now()
        return "" if pinned is None else to_ms(pinned)

    def now_in(self, conn: Connection) -> datetime:
        """The time a decision in this transaction compares with stored times: the
        database's own (PostgreSQL ``now()``, SQLite's ``'now'``: the host's, never this
        process's idea of it), or a test's injected clock (``pinned_now``)."""
        pinned = self.pinned_now()
        if pinned is not None:
            return pinned
        return store.db_now(conn)

    def db_now(self) -> datetime:
        """``now_in`` in a read transaction of its own (one round trip on PostgreSQL):
        for the periodic checks and the status, whose stale rules and stall clocks compare
        stored times."""
        pinned = self.pinned_now()
        if pinned is not None:
            return pinned
        with transaction(self.engine, write=False) as conn:
            return store.db_now(conn)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_prefix)

    @cached_property
    def fast_redis(self) -> Redis:
        """The fast path's client: same server, ``redis_fast_path_timeout_ms`` deadline,
        no retries (SPEC 4.7). Built on first use."""
        return make_fast_redis(self.settings.effective_redis_url,
                               timeout_s=self.settings.redis_fast_path_timeout_ms / 1000)

    @cached_property
    def redis_health(self) -> RedisHealth:
        """Whether the fast path may ask Redis now (degraded while it is away)."""
        s = self.settings
        return RedisHealth(first_ms=s.redis_reprobe_first_ms, max_ms=s.redis_reprobe_max_ms,
                           misses=s.redis_degraded_after_misses)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, clock: Clock = utcnow) -> Context:
        """Build engine and Redis client from settings (defaults: the process settings)."""
        s = settings or get_settings()
        engine = make_engine(s.database_url, connect_timeout_s=s.db_connect_timeout_s,
                             busy_timeout_s=s.db_busy_timeout_s)
        client = make_redis(s.effective_redis_url, socket_timeout_s=s.redis_socket_timeout_s)
        return cls(settings=s, engine=engine, redis=client, clock=clock)

    def close(self) -> None:
        """Release pooled connections (and end push pickup's threads)."""
        hub = self.__dict__.pop("_pickup_hub", None)  # app.storage.pickup_hub's
        if hub is not None:
            hub.close()
        self.engine.dispose()
        self.redis.close()
        fast = self.__dict__.get("fast_redis")
        if fast is not None:
            fast.close()
            fast.connection_pool.disconnect()
        listener = self.__dict__.pop("_pickup_listener", None)  # app.storage.pickup's
        if listener is not None:
            listener.close()
