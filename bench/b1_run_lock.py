"""Bench 1: a run-lock acquire + release cycle (``locks.acquire`` + ``locks.release``, with
the registry and the holder metadata), uncontended, one process.

Baselines, measured in the same run against the same Redis (each on its own key):
redis-py's ``Lock`` (SET NX PX + a Lua release), python-redis-lock's ``Lock`` and pottery's
``Redlock`` with one master. Rounds are interleaved. Target: >= 1.0x redis-py ``Lock``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis_lock
from pottery import Redlock

from app.storage import locks
from bench.common import Env, Row, interleaved_rates

BUDGET_MS = 60_000


def contenders(env: Env, ctx: Any) -> dict[str, Callable[[], Any]]:
    client = ctx.redis  # the same client (and connection pool) for every contender
    p = env.prefix + "b1:"
    holder = locks.default_holder("bench")

    def ours() -> None:
        token = locks.acquire(ctx, "b1-job", budget_ms=BUDGET_MS, holder=holder)
        assert token is not None
        assert locks.release(ctx, "b1-job", token)

    plain = client.lock(p + "redis-py", timeout=BUDGET_MS / 1000)

    def redis_py() -> None:
        assert plain.acquire(blocking=False)
        plain.release()

    prl = redis_lock.Lock(client, p + "python-redis-lock", expire=BUDGET_MS // 1000)

    def python_redis_lock() -> None:
        assert prl.acquire(blocking=False)
        prl.release()

    red = Redlock(key=p + "pottery", masters={client}, auto_release_time=BUDGET_MS / 1000)

    def pottery() -> None:
        assert red.acquire(blocking=False)
        red.release()

    return {"locks": ours, "redis-py Lock": redis_py, "python-redis-lock": python_redis_lock,
            "pottery Redlock (1 master)": pottery}


def run(env: Env) -> list[Row]:
    ctx = env.context(env.sqlite_database())  # the database is not touched here
    try:
        fns = contenders(env, ctx)
        for fn in fns.values():  # warm: scripts loaded, connection open
            fn()
        got = interleaved_rates(fns, n=env.size(2_000, 20), rounds=env.size(5, 1))
    finally:
        ctx.close()
    ours = got.pop("locks")
    rows = []
    for name, rate in got.items():
        rows.append(Row(
            bench=1, what="run-lock acquire+release (locks, registry + metadata), 1 process",
            figure=ours, unit="cycles/s", baseline=rate, baseline_what=name,
            target=">= 1.0" if name == "redis-py Lock" else "report"))
    return rows
