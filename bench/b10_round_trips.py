"""Bench 10 (issue 13 c): what one claim + complete cycle sends on the wire, on PostgreSQL
and Redis -- round trips, transactions, and the statements themselves.

The figure is a count, not a speed: it does not depend on the machine's load. Baseline:
the counts before issue 13 (12 PostgreSQL round trips in 2 transactions, 3 Redis round
trips), so the ratio says how much of that is left. ``tests/test_roundtrips.py`` asserts
the same counts so they cannot grow back.
"""

from __future__ import annotations

from typing import Any

from app import ops
from app.ops import batch, lane_control, lanes
from app.storage.context import Context
from bench.common import Env, Row
from bench.roundtrips import PgTrace, WireCount, count_wire

# measured on the commit before issue 13's changes (docs/benchmarks.md, bench 10)
BEFORE = {"pgRoundTrips": 12, "pgTransactions": 2, "redisRoundTrips": 3}
LANE = "rt-lane"


def cycle_counts(ctx: Context, trace: PgTrace) -> dict[str, WireCount]:
    """The counts of one claim, one complete, an empty-lane claim, and a worker's steady
    cycle (a complete that also claims the next task: ``claimNext``), on a warm context
    (scripts loaded, pool filled, statements prepared)."""
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=4, actor="bench")
    for i in range(10):  # 8 warm, the counted one, one more: then empty
        lanes.create(ctx, assignee=LANE, title=f"rt {i}")

    def claim() -> dict[str, Any]:
        return lanes.claim(ctx, assignee=LANE, worker="rt-worker")

    def complete(got: dict[str, Any]) -> None:
        lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                       outcome="success")

    for _ in range(8):  # warm: psycopg prepares a statement on its 5th run
        complete(claim())
    box: dict[str, Any] = {}
    out = {"claim": count_wire(trace, lambda: box.update(got=claim()))}
    assert box["got"].get("lease") and not box["got"].get("guard"), box["got"]
    out["complete"] = count_wire(trace, lambda: complete(box["got"]))
    complete(claim())  # the lane is empty now
    out["empty claim"] = count_wire(trace, claim)
    out["worker cycle"] = _worker_cycle(ctx, trace)
    out["batched cycle"] = _batched_cycle(ctx, trace)
    return out


def _worker_cycle(ctx: Context, trace: PgTrace) -> WireCount:
    """What ``LaneWorker`` sends per task once it runs: complete + claim next, one call."""
    for i in range(10):
        lanes.create(ctx, assignee=LANE, title=f"cycle {i}")
    got = lanes.claim(ctx, assignee=LANE, worker="rt-worker")

    def cycle() -> None:
        nonlocal got
        got = lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                             outcome="success",
                             claim_next={"assignee": LANE, "worker": "rt-worker"})["next"]
        assert got.get("lease") and not got.get("guard"), got

    for _ in range(7):  # warm
        cycle()
    return count_wire(trace, cycle)


BATCH_K = 10  # the prefetch of bench 8's batched mode


def _batched_cycle(ctx: Context, trace: PgTrace) -> WireCount:
    """What ``LaneWorker(prefetch=K)`` sends per K tasks once it runs: one
    ``complete_many`` of K that hands over the next K (issue 22)."""
    # the worker cycle above still holds its last lease: room for K more
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=BATCH_K + 1, actor="bench")
    for i in range(BATCH_K * 10):
        lanes.create(ctx, assignee=LANE, title=f"batch {i}")
    got = batch.claim(ctx, assignee=LANE, worker="rt-batch", max_n=BATCH_K)

    def cycle() -> None:
        nonlocal got
        items = [{"taskId": x["task"]["id"], "leaseToken": x["lease"]["token"]}
                 for x in got["leases"]]
        got = ops.dispatch(ctx, {"action": "complete_many", "items": items, "max": BATCH_K,
                                 "claimNext": {"assignee": LANE, "worker": "rt-batch"}}
                           )["next"]
        assert len(got["leases"]) == BATCH_K, len(got["leases"])

    for _ in range(7):  # warm
        cycle()
    return count_wire(trace, cycle)


def total(counts: dict[str, WireCount]) -> dict[str, int]:
    """Claim + complete together, as separate calls."""
    c, d = counts["claim"], counts["complete"]
    return {"pgRoundTrips": c.pg_round_trips + d.pg_round_trips,
            "pgTransactions": c.pg_transactions + d.pg_transactions,
            "redisRoundTrips": c.redis_round_trips + d.redis_round_trips}


def run(env: Env) -> list[Row]:
    url = env.pg_database()
    ctx = env.context(url)
    trace = PgTrace(ctx.engine)
    try:
        counts = cycle_counts(ctx, trace)
    finally:
        trace.close()
        ctx.close()
    t, w = total(counts), counts["worker cycle"].to_json()
    b = counts["batched cycle"].to_json()
    details = {k: v.to_json() for k, v in counts.items()}
    labels = (("pgRoundTrips", "PostgreSQL round trips"),
              ("pgTransactions", "PostgreSQL transactions"),
              ("redisRoundTrips", "Redis round trips"))
    return [
        Row(bench=10, what=f"claim+complete: {label}", figure=t[key], unit="per cycle",
            baseline=BEFORE[key], baseline_what="before issue 13", target="report",
            details=details if key == "pgRoundTrips" else {})
        for key, label in labels
    ] + [
        Row(bench=10, what=f"worker cycle (complete + claimNext): {label}", figure=w[key],
            unit="per cycle", baseline=BEFORE[key], baseline_what="before issue 13",
            target="report")
        for key, label in labels
    ] + [
        Row(bench=10, what=f"batched cycle (complete_many of {BATCH_K} + the next "
            f"{BATCH_K}): {label} per task", figure=b[key] / BATCH_K, unit="per task",
            baseline=w[key], baseline_what="worker cycle (one task)", target="report")
        for key, label in labels
    ]
