"""What every benchmark shares: the result row, the servers it runs against (a Redis key
prefix of its own, a PostgreSQL database of its own, a SQLite temp file), and timing.

Nothing here touches keys or databases it did not create: Redis keys live under
``bench:<random>:`` and are deleted by prefix afterwards (never FLUSHALL); each PostgreSQL
database is created for the run and dropped with ``WITH (FORCE)`` at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from app.clock import Clock, utcnow
from app.settings import Settings
from app.storage import db
from app.storage.context import Context

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Row:
    """One line of the results table: a figure beside a baseline measured in the same run.

    ``ratio`` is ``figure / baseline``; ``target`` reads like ``">= 1.0"`` or ``"<= 3"``
    (applied to the ratio), or ``"report"`` when the issue asks for the number only.
    """

    bench: int
    what: str
    figure: float
    unit: str
    baseline: float
    baseline_what: str
    target: str
    details: dict[str, Any] = field(default_factory=dict)
    # a second condition on top of the ratio (e.g. "duplicates = 0"), already judged
    extra_ok: bool | None = None
    extra_target: str = ""

    @property
    def ratio(self) -> float | None:
        """``figure / baseline``; None when no baseline was measured (a peer not run)."""
        return self.figure / self.baseline if self.baseline else None

    def ratio_text(self, digits: int = 3) -> str:
        return "no baseline" if self.ratio is None else f"{self.ratio:.{digits}g}×"

    @property
    def met(self) -> bool | None:
        if self.target == "report":
            ok: bool | None = None
        else:
            op, _, num = self.target.partition(" ")
            limit = float(num)
            r = self.ratio
            # a ratio target without a baseline is not met: nothing was compared
            ok = r is not None and (r >= limit if op == ">=" else r <= limit)
        if self.extra_ok is not None:
            ok = self.extra_ok if ok is None else (ok and self.extra_ok)
        return ok

    def target_text(self) -> str:
        pretty = self.target.replace(">=", "≥").replace("<=", "≤")
        t = "report" if self.target == "report" else f"ratio {pretty}×"
        return f"{t}; {self.extra_target}" if self.extra_target else t

    def to_json(self) -> dict[str, Any]:
        return {"bench": self.bench, "what": self.what, "figure": self.figure,
                "unit": self.unit, "baseline": self.baseline,
                "baselineWhat": self.baseline_what, "ratio": self.ratio,
                "target": self.target_text(), "met": self.met, "details": self.details}


class Env:
    """The servers one run uses, and everything it created on them (removed by ``close``)."""

    def __init__(self, *, quick: bool, redis_url: str, pg_url: str) -> None:
        self.quick = quick
        self.redis_url = redis_url
        self.pg_admin_url = db.normalise_url(pg_url)
        self.prefix = f"bench:{uuid.uuid4().hex[:10]}:"
        self.tmp = tempfile.mkdtemp(prefix="autonomy-bench-")
        self._databases: list[str] = []
        self._template: str | None = None
        self._admin = sa.create_engine(self.pg_admin_url, isolation_level="AUTOCOMMIT",
                                       poolclass=sa.pool.NullPool)

    @classmethod
    def from_environment(cls, *, quick: bool) -> Env:
        return cls(quick=quick,
                   redis_url=os.environ.get("REDIS_URL") or os.environ.get("TEST_REDIS_URL")
                   or DEFAULT_REDIS_URL,
                   pg_url=os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG_URL)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    # --- databases ----------------------------------------------------------------
    def pg_database(self) -> str:
        """A fresh migrated PostgreSQL database of this run's own (copied from a template)."""
        if self._template is None:
            self._template = self._create_db("autonomy_bench_tmpl")
            db.upgrade(self._url_for(self._template))
        name = self._create_db("autonomy_bench", template=self._template)
        return self._url_for(name)

    def sqlite_database(self) -> str:
        path = os.path.join(self.tmp, f"{uuid.uuid4().hex[:8]}.db")
        url = f"sqlite:///{path}"
        db.upgrade(url)
        return url

    def _create_db(self, stem: str, template: str | None = None) -> str:
        name = f"{stem}_{uuid.uuid4().hex[:10]}"
        with self._admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"'
                              + (f' TEMPLATE "{template}"' if template else ""))
        self._databases.append(name)
        return name

    def _url_for(self, name: str) -> str:
        return make_url(self.pg_admin_url).set(database=name).render_as_string(
            hide_password=False)

    # --- contexts -----------------------------------------------------------------
    def settings(self, database_url: str, **overrides: Any) -> Settings:
        return Settings(database_url=database_url, redis_url=self.redis_url,  # type: ignore[arg-type]
                        redis_prefix=self.prefix, **overrides)

    def context(self, database_url: str, *, clock: Clock = utcnow,
                redis_client: redis.Redis | None = None, **overrides: Any) -> Context:
        s = self.settings(database_url, **overrides)
        ctx = Context.from_settings(s, clock=clock)
        if redis_client is not None:
            ctx.redis.close()
            ctx.redis = redis_client
        return ctx

    def redis(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, **kwargs)

    # --- cleanup ------------------------------------------------------------------
    def delete_prefix(self, prefix: str | None = None) -> int:
        """Delete every key under this run's prefix (or a narrower one under it)."""
        prefix = prefix or self.prefix
        assert prefix.startswith(self.prefix)
        client = self.redis()
        n = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                n += client.unlink(*batch)
                batch.clear()
        if batch:
            n += client.unlink(*batch)
        client.close()
        return n

    def close(self) -> None:
        self.delete_prefix()
        with self._admin.connect() as c:
            for name in reversed(self._databases):
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def environment(*, quick: bool) -> Iterator[Env]:
    env = Env.from_environment(quick=quick)
    try:
        yield env
    finally:
        env.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- timing -------------------------------------------------------------------------


def rate(fn: Callable[[], Any], n: int) -> float:
    """Calls per second of ``fn`` over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def latency_s(fn: Callable[[], Any], n: int) -> float:
    """Median seconds per call of ``fn`` over ``n`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_rates(fns: dict[str, Callable[[], Any]], *, n: int, rounds: int
                      ) -> dict[str, float]:
    """Median calls/s of each function over ``rounds`` rounds, taken in turn so drift in
    the machine's load hits every contender alike."""
    seen: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seen[name].append(rate(fn, n))
    return {k: statistics.median(v) for k, v in seen.items()}
