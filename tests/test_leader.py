"""The beat leader lease (``app.storage.leader``, ``app.storage.beat_guard``): one holder,
renewed by its token only, a TTL instead of a budget, standbys listed; shown apart from
the run-locks in the status payload and ``autonomy locks``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.clock import FrozenClock, from_ms, iso, to_ms
from app.ops.checks.status import build_status
from app.settings import Settings
from app.storage import beat_guard, leader, locks
from app.storage.context import Context
from tests.conftest import make_settings


@pytest.fixture
def real_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """A real-clock context with a short lease, for the leader/standby threads."""
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            beat_lease_ttl_ms=1_000, beat_lease_renew_ms=100,
                                            beat_standby_poll_s=0.05))
    yield c
    c.close()


def _until(what: str, pred: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"{what} not seen within {timeout_s}s")


def test_one_holder_renews_by_token_and_the_view_shows_leader_since_renewed_and_ttl(
        ctx: Context, clock: FrozenClock) -> None:
    token, other = leader.acquire(ctx, "host:1:beat")
    assert token is not None and other is None
    assert leader.acquire(ctx, "host:2:beat") == (None, "host:1:beat")
    since = ctx.clock()
    clock.advance(seconds=3)
    assert leader.renew(ctx, token) == leader.RENEWED
    assert leader.renew(ctx, "not-the-token") == leader.TAKEN
    v = leader.view(ctx)
    assert v == {"leader": "host:1:beat", "since": iso(from_ms(to_ms(since))),
                 "renewedAt": iso(from_ms(to_ms(ctx.clock()))),
                 "ttlMs": ctx.settings.beat_lease_ttl_ms, "standbys": []}
    assert leader.release(ctx, "not-the-token") is False
    assert leader.release(ctx, token) is True
    assert leader.renew(ctx, token) == leader.GONE
    assert leader.view(ctx)["leader"] is None


def test_standbys_are_listed_until_they_stop_saying_so_for_one_ttl(
        ctx: Context, clock: FrozenClock) -> None:
    leader.acquire(ctx, "a:1:beat")
    leader.stand_by(ctx, "b:2:beat")
    leader.stand_by(ctx, "c:3:beat")
    assert leader.view(ctx)["standbys"] == ["b:2:beat", "c:3:beat"]
    assert leader.heartbeat_of(ctx, "a:") == "leader"
    assert leader.heartbeat_of(ctx, "b:") == "standby"
    assert leader.heartbeat_of(ctx, "z:") is None
    clock.advance(milliseconds=ctx.settings.beat_lease_ttl_ms + 1)
    leader.stand_by(ctx, "c:3:beat")
    assert leader.view(ctx)["standbys"] == ["c:3:beat"]
    assert leader.heartbeat_of(ctx, "b:") is None


def test_the_lease_lapses_within_its_ttl_when_not_renewed(real_ctx: Context) -> None:
    token, _ = leader.acquire(real_ctx, "dead:1:beat")
    assert token is not None
    _until("the unrenewed lease to lapse", lambda: leader.view(real_ctx)["leader"] is None, 5)
    assert leader.acquire(real_ctx, "next:2:beat")[0] is not None


def test_the_leader_is_not_a_run_lock_and_status_shows_it_apart(real_ctx: Context) -> None:
    stop = threading.Event()
    try:
        token = beat_guard.lead(real_ctx, holder="h:9:beat", stop=stop, on_lost=stop.set)
        assert token is not None
        st = build_status(real_ctx)
        assert all(lk["job"] != "beat" for lk in st["workflowHealth"]["runLocks"])
        assert all(lk["budgetMs"] <= 3_600_000 for lk in st["workflowHealth"]["runLocks"])
        assert locks.collect_run_locks(real_ctx) == []
        beat = st["beat"]
        assert set(beat) == {"leader", "since", "renewedAt", "ttlMs", "standbys"}
        assert beat["leader"] == "h:9:beat" and beat["ttlMs"] == 1_000
        first_renewal = beat["renewedAt"]
        _until("a renewal", lambda: leader.view(real_ctx)["renewedAt"] != first_renewal, 5)
    finally:
        stop.set()


def test_a_standby_takes_over_within_the_ttl_once_the_leader_stops_renewing(
        real_ctx: Context) -> None:
    stop_a, stop_b = threading.Event(), threading.Event()
    got_b: list[str | None] = []
    try:
        assert beat_guard.lead(real_ctx, holder="a:1:beat", stop=stop_a, on_lost=stop_a.set)
        tb = threading.Thread(target=lambda: got_b.append(
            beat_guard.lead(real_ctx, holder="b:2:beat", stop=stop_b, on_lost=stop_b.set)))
        tb.start()
        _until("b to stand by", lambda: leader.view(real_ctx)["standbys"] == ["b:2:beat"])
        assert leader.view(real_ctx)["leader"] == "a:1:beat"
        stop_a.set()  # a's renewal thread stops, as if a was killed
        tb.join(timeout=10)
        assert got_b and got_b[0] is not None
        v = leader.view(real_ctx)
        assert v["leader"] == "b:2:beat" and v["standbys"] == []
    finally:
        stop_a.set()
        stop_b.set()


def test_the_renewal_must_run_inside_the_ttl(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="beat_lease_renew_ms"):
        Settings(database_url=sqlite_url, beat_lease_ttl_ms=1_000, beat_lease_renew_ms=1_000)


def test_with_redis_down_status_says_nobody_is_known_to_lead_in_the_same_shape(
        sqlite_url: str, redis_prefix: str) -> None:
    from tests.servers import ThrowawayRedis

    own = ThrowawayRedis()
    ctx = Context.from_settings(make_settings(sqlite_url, own.url, redis_prefix,
                                              redis_socket_timeout_s=1))
    try:
        leader.acquire(ctx, "h:1:beat")
        assert build_status(ctx)["beat"]["leader"] == "h:1:beat"
        own.stop()
        st = build_status(ctx)
        assert st["redis"] == "degraded"
        assert st["beat"] == {"leader": None, "since": None, "renewedAt": None,
                              "ttlMs": ctx.settings.beat_lease_ttl_ms, "standbys": []}
    finally:
        ctx.close()
