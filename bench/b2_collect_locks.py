"""Bench 2: ``locks.collect_run_locks()`` with 10, 1,000 and 10,000 held locks, in a Redis
that also holds 100,000 unrelated keys.

Baseline: what listing the locks costs without the registry -- ``SCAN MATCH <prefix>lock:*
COUNT 1000`` over the whole keyspace, then one pipeline of ``HGETALL`` + ``PTTL`` per lock
key found. Both sides are timed on the same data in the same run, interleaved.

Round trips are counted, not inferred: the client's connections are a subclass that counts
every write of a command (or of a pipeline) to the socket -- one write, one round trip.
Targets: the collect's round trips per call are the same at every N, and at 10,000 locks
it is >= 10x faster than the SCAN baseline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, ClassVar

import redis

from app.storage import locks
from bench.common import Env, Row


class CountingConnection(redis.Connection):
    """A redis-py connection that counts its socket writes (each is one round trip)."""

    writes: ClassVar[int] = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        super().send_packed_command(command, check_health)


def counting_client(url: str) -> redis.Redis:
    pool = redis.ConnectionPool.from_url(url, decode_responses=True,
                                         connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


def scan_baseline(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every lock by SCAN + one pipeline of HGETALL/PTTL (the way without a registry)."""
    keys = [k for k in client.scan_iter(match=f"{prefix}lock:*", count=1000)
            if not k.endswith(":beat")]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(k)
        pipe.pttl(k)
    res = pipe.execute()
    return [{"key": k, **res[2 * i], "pttl": res[2 * i + 1]} for i, k in enumerate(keys)]


def per_call(fn: Callable[[], Any], calls: int) -> tuple[float, float, Any]:
    """(median seconds, round trips per call, last answer)."""
    answer = fn()
    times = []
    before = CountingConnection.writes
    for _ in range(calls):
        t0 = time.perf_counter()
        answer = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (CountingConnection.writes - before) / calls, answer


def _fill_unrelated(env: Env, n: int) -> None:
    client = env.redis()
    batch = 5_000
    for lo in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        pipe.mset({f"{env.prefix}b2:unrelated:{i}": "x" for i in range(lo, min(n, lo + batch))})
        pipe.execute()
    client.close()


def _hold(ctx: Any, upto: int, have: int) -> None:
    for i in range(have, upto):
        assert locks.acquire(ctx, f"b2-job-{i}", budget_ms=600_000, holder="bench") is not None


def run(env: Env) -> list[Row]:
    sizes = (10, 1_000, 10_000) if not env.quick else (10, 100, 300)
    unrelated = env.size(100_000, 2_000)
    calls = {n: max(3, min(200, 20_000 // n)) for n in sizes} if not env.quick \
        else dict.fromkeys(sizes, 3)
    client = counting_client(env.redis_url)
    ctx = env.context(env.sqlite_database(), redis_client=client)
    rows = []
    try:
        _fill_unrelated(env, unrelated)
        dbsize = client.dbsize()
        have = 0
        results = {}
        for n in sizes:
            _hold(ctx, n, have)
            have = n
            t_ours, rt_ours, got = per_call(lambda: locks.collect_run_locks(ctx), calls[n])
            t_scan, rt_scan, scanned = per_call(lambda: scan_baseline(client, env.prefix),
                                                max(3, calls[n] // 4))
            assert len(got) == n == len(scanned), (len(got), n, len(scanned))
            results[n] = (t_ours, rt_ours, t_scan, rt_scan)
        rts = {n: r[1] for n, r in results.items()}
        flat = len(set(rts.values())) == 1
        for n, (t_ours, rt_ours, t_scan, rt_scan) in results.items():
            rows.append(Row(
                bench=2, what=f"locks.collect_run_locks, {n:,} held locks, "
                              f"{dbsize:,} keys in Redis",
                figure=1 / t_ours, unit="calls/s", baseline=1 / t_scan,
                baseline_what="SCAN MATCH COUNT 1000 + pipelined HGETALL/PTTL",
                target=">= 10" if n == max(sizes) else "report", extra_ok=flat,
                extra_target=f"round trips {rt_ours:g}/call at every N "
                             f"(SCAN: {rt_scan:g})",
                details={"heldLocks": n, "keysInRedis": dbsize, "medianMs": t_ours * 1000,
                         "scanMedianMs": t_scan * 1000, "roundTrips": rt_ours,
                         "scanRoundTrips": rt_scan, "roundTripsByN": rts}))
    finally:
        ctx.close()
        env.delete_prefix(env.prefix + "b2:")
        env.delete_prefix(env.prefix + "lock")
    return rows
