"""Bench 12: what running the Lua scripts through redis-py's public API costs a claim +
complete cycle (issue 12, item 3).

Figure: claim+complete cycles/s through ``app.ops.lanes`` with the shipped runner
(``app.storage.redis_scripts.run_script``: ``evalsha`` / ``eval`` on the client).
Baseline: the same cycles with the earlier runner, kept here as the comparison only: one
pool connection kept per context, driven through redis-py's connection internals
(``send_command`` / ``read_response``), ~25 us a call cheaper. Interleaved rounds on one
PostgreSQL database. Target: the public API costs at most 10 % of a cycle (ratio >= 0.9).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError

from app.clock import utcnow
from app.storage import leases, locks, redis_scripts, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.redis_scripts import Script
from bench.b3_claim_complete import ops_cycle
from bench.common import Env, Row, interleaved_rates
from bench.seed import analyze, seed_todo

Runner = Callable[..., Any]


def kept_connection_runner(ctx: Context) -> tuple[Runner, list[tuple[Any, Any]]]:
    """The earlier runner: EVALSHA on one kept pool connection per client (the fast path's
    and the ordinary one), through redis-py's connection internals. Answers the runner and
    the (pool, connection) pairs to hand back afterwards."""
    kept = {id(r): (r.connection_pool, r.connection_pool.get_connection())
            for r in (ctx.redis, ctx.fast_redis)}

    def run(_ctx: Context, lua: Script, numkeys: int, *keys_and_args: Any,
            fast: bool = False) -> Any:
        _, conn = kept[id(ctx.fast_redis if fast else ctx.redis)]

        def once(args: tuple[Any, ...]) -> Any:
            conn.send_command(*args)
            return conn.read_response()
        try:
            return once(("EVALSHA", lua.sha, numkeys, *keys_and_args))
        except NoScriptError:
            return once(("EVAL", lua.body, numkeys, *keys_and_args))
    return run, list(kept.values())


def _use(runner: Runner) -> None:
    leases.run_script = runner  # type: ignore[attr-defined]
    locks.run_script = runner  # type: ignore[attr-defined]


def per_call_us(ctx: Context, runner: Runner, n: int) -> float:
    probe = Script("return redis.call('PEXPIRE', KEYS[1], ARGV[1])")
    key = ctx.keys.prefix + "b12:probe"
    t0 = time.perf_counter()
    for _ in range(n):
        runner(ctx, probe, 1, key, 1000)
    return (time.perf_counter() - t0) / n * 1e6


def run(env: Env) -> list[Row]:
    n, rounds = env.size(300, 5), env.size(5, 1)
    ctx = env.context(env.pg_database())
    public: Runner = redis_scripts.run_script
    kept, kept_conns = kept_connection_runner(ctx)
    try:
        now = utcnow()
        for lane in ("b12public", "b12kept"):
            with transaction(ctx.engine) as conn:
                store.ensure_lane(conn, assignee=lane, now=now, max_in_flight=1)
            seed_todo(ctx.engine, assignee=lane, n=n * rounds + 5, now=now)
        analyze(ctx.engine)

        def with_public() -> None:
            _use(public)
            ops_cycle(ctx, assignee="b12public", worker="p1")

        def with_kept() -> None:
            _use(kept)
            ops_cycle(ctx, assignee="b12kept", worker="k1")

        with_public(), with_kept()  # warm
        got = interleaved_rates({"public": with_public, "kept": with_kept}, n=n, rounds=rounds)
        calls = env.size(5000, 200)
        us = {"publicUsPerCall": per_call_us(ctx, public, calls),
              "keptUsPerCall": per_call_us(ctx, kept, calls)}
    finally:
        _use(public)
        for pool, conn in kept_conns:
            pool.release(conn)
        ctx.close()
    cycle_us = 1e6 / got["public"]
    return [Row(
        bench=12, what="claim+complete, scripts via redis-py's public API, PostgreSQL",
        figure=got["public"], unit="cycles/s", baseline=got["kept"],
        baseline_what="same cycle, scripts on a kept connection (redis-py internals)",
        target=">= 0.9",
        details={**{k: round(v, 1) for k, v in us.items()},
                 "cycleUs": round(cycle_us, 1), "cyclesPerRound": n, "rounds": rounds})]
