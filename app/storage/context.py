"""The context every operation runs in: settings, engine, Redis, keys and a clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from sqlalchemy.engine import Engine

from app.clock import Clock, utcnow
from app.settings import Settings, get_settings
from app.storage.db import make_engine
from app.storage.redis_conn import make_redis
from app.storage.redis_keys import Keys


@dataclass
class Context:
    """What an operation needs; adapters build one and pass it in."""

    settings: Settings
    engine: Engine
    redis: redis.Redis
    clock: Clock = field(default=utcnow)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_prefix)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, clock: Clock = utcnow) -> Context:
        """Build engine and Redis client from settings (defaults: the process settings)."""
        s = settings or get_settings()
        engine = make_engine(s.database_url, connect_timeout_s=s.db_connect_timeout_s,
                             busy_timeout_s=s.db_busy_timeout_s)
        client = make_redis(s.effective_redis_url, socket_timeout_s=s.redis_socket_timeout_s)
        return cls(settings=s, engine=engine, redis=client, clock=clock)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()
        self.redis.close()
