"""What a claim + complete cycle sends on the wire (issue 13 c), counted from libpq's
protocol trace and redis-py's socket writes (``bench/roundtrips.py``), so the count cannot
silently grow back. Before issue 13 a cycle took 12 PostgreSQL round trips in 2
transactions (a pre-ping, BEGIN, 4 statements and COMMIT; then a pre-ping, BEGIN, 2
statements and COMMIT) and 3 Redis round trips."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.storage.context import Context
from bench.b10_round_trips import cycle_counts, total
from bench.roundtrips import PgTrace, WireCount
from tests.conftest import make_settings

pytestmark = pytest.mark.postgres


@pytest.fixture
def counted(pg_url: str, redis_server_url: str, redis_prefix: str
            ) -> Iterator[dict[str, WireCount]]:
    ctx = Context.from_settings(make_settings(pg_url, redis_server_url, redis_prefix))
    trace = PgTrace(ctx.engine)
    try:
        yield cycle_counts(ctx, trace)
    finally:
        trace.close()
        ctx.close()


def test_a_claim_is_one_postgres_round_trip_in_one_transaction(
        counted: dict[str, WireCount]) -> None:
    claim = counted["claim"]
    assert (claim.pg_round_trips, claim.pg_transactions, claim.pg_pings) == (1, 1, 0), \
        claim.statements
    assert claim.statements[0].startswith("SELECT outcome, row_json FROM autonomy_claim(")


def test_a_complete_is_one_postgres_round_trip_in_one_transaction(
        counted: dict[str, WireCount]) -> None:
    done = counted["complete"]
    assert (done.pg_round_trips, done.pg_transactions, done.pg_pings) == (1, 1, 0), \
        done.statements


def test_a_claim_on_an_empty_lane_is_one_round_trip_too(
        counted: dict[str, WireCount]) -> None:
    empty = counted["empty claim"]
    assert (empty.pg_round_trips, empty.pg_transactions) == (1, 1), empty.statements


def test_a_cycle_costs_two_postgres_and_three_redis_round_trips(
        counted: dict[str, WireCount]) -> None:
    """Redis: the claim's check (which reserves the slot), the lease's record, the
    complete's drop -- one script call each."""
    assert total(counted) == {"pgRoundTrips": 2, "pgTransactions": 2, "redisRoundTrips": 3}


def test_a_workers_cycle_is_one_postgres_and_two_redis_round_trips(
        counted: dict[str, WireCount]) -> None:
    """``LaneWorker``'s steady state: a complete that also claims the next task
    (``claimNext``) -- ``autonomy_complete`` in one statement and one transaction; Redis:
    the hand-over (drop the lease, check and reserve the next claim) and the new lease's
    record."""
    cycle = counted["worker cycle"]
    assert (cycle.pg_round_trips, cycle.pg_transactions, cycle.pg_pings,
            cycle.redis_round_trips) == (1, 1, 0, 2), cycle.to_json()
    assert cycle.statements[0].startswith("SELECT outcome, row_json FROM autonomy_complete(")


def test_the_counter_sees_a_transaction_of_several_statements(
        pg_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """The instrument itself: BEGIN, two statements and COMMIT are four round trips and
    one transaction (so a cycle's count of 1 is not the counter missing things)."""
    import sqlalchemy as sa

    from app.storage.db import transaction
    from bench.roundtrips import count_wire

    ctx = Context.from_settings(make_settings(pg_url, redis_server_url, redis_prefix))
    trace = PgTrace(ctx.engine)
    try:
        def work() -> None:
            with transaction(ctx.engine) as conn:
                conn.execute(sa.text("SELECT 1 + 1"))
                conn.execute(sa.text("SELECT 2 + 2"))
            ctx.redis.ping()

        work()
        got = count_wire(trace, work)
    finally:
        trace.close()
        ctx.close()
    assert (got.pg_round_trips, got.pg_transactions, got.redis_round_trips) == (4, 1, 1), \
        got.to_json()
