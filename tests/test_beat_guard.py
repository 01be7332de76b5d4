"""The beat leader lease through Redis faults (SPEC 4.7): a leader whose lease vanished
re-takes it (not a takeover); only a lease held by another beat is; with two beats exactly
one leads after every fault. In-process beats (threads) against a redis-server each test
owns, with a fast heartbeat."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from app.storage import beat_guard, leader
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis


def _until(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not in time"
        time.sleep(0.02)


@dataclass
class Beat:
    """One in-process beat: ``lead`` in a thread; ``lost`` set if it is ever taken over."""

    name: str
    ctx: Context
    stop: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    token: str | None = None
    thread: threading.Thread | None = None

    def start(self) -> Beat:
        def run() -> None:
            self.token = beat_guard.lead(self.ctx, holder=self.name, stop=self.stop,
                                         on_lost=self.lost.set)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    @property
    def leads(self) -> bool:
        return self.token is not None and not self.lost.is_set() and not self.stop.is_set()


@pytest.fixture
def beats(sqlite_url: str, own_redis: ThrowawayRedis) -> Iterator[Callable[[str], Beat]]:
    made: list[Beat] = []

    def make(name: str) -> Beat:
        s = make_settings(sqlite_url, own_redis.url, "t:", beat_lease_renew_ms=100,
                          beat_lease_ttl_ms=600, beat_standby_poll_s=0.1,
                          redis_socket_timeout_s=0.5)
        b = Beat(name, Context.from_settings(s))
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop.set()
    for b in made:
        assert b.thread is not None
        b.thread.join(30)
        time.sleep(3 * b.ctx.settings.beat_lease_renew_ms / 1000)  # its renewing thread
        b.ctx.close()


def _holder(ctx: Context) -> str | None:
    try:
        return leader.view(ctx)["leader"]  # type: ignore[no-any-return]
    except Exception:
        return None


def test_a_lone_leader_retakes_its_vanished_key_after_a_redis_restart(
        beats: Callable[[str], Beat], own_redis: ThrowawayRedis) -> None:
    """Before: the leader read the vanished key as a takeover and stopped itself."""
    b = beats("b1")
    _until("b1 leads", lambda: b.leads and _holder(b.ctx) == "b1")
    for _ in range(2):
        own_redis.restart()
        _until("b1 re-takes its key", lambda: _holder(b.ctx) == "b1")
        assert b.leads and not b.lost.is_set()


@pytest.mark.slow
def test_two_beats_exactly_one_leads_after_restarts_and_a_stall(
        beats: Callable[[str], Beat], own_redis: ThrowawayRedis,
        caplog: pytest.LogCaptureFixture) -> None:
    first = beats("b1")
    _until("b1 leads", lambda: first.leads)
    second = beats("b2")
    _until("b2 stands by", lambda: "this beat (b2) stands by" in caplog.text)
    for fault in ("restart", "restart", "stall"):
        if fault == "restart":
            own_redis.restart()
        else:
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            time.sleep(1.0)  # the fault itself: longer than the lease's TTL (600 ms)
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        _until(f"one leader after {fault}",
               lambda: _holder(first.ctx) in ("b1", "b2")
               and [first.leads, second.leads].count(True) == 1)
        leader = first if first.leads else second
        assert _holder(first.ctx) == leader.name
    assert not first.lost.is_set()  # the incumbent kept its lead through every fault


def test_a_standby_takes_over_when_the_leader_stops_beating(
        beats: Callable[[str], Beat], caplog: pytest.LogCaptureFixture) -> None:
    first = beats("b1")
    _until("b1 leads", lambda: first.leads)
    second = beats("b2")
    _until("b2 stands by", lambda: "this beat (b2) stands by" in caplog.text)
    first.stop.set()  # its renewing thread ends: as if it were killed
    _until("b2 takes over", lambda: second.leads and _holder(second.ctx) == "b2")


def test_a_lease_held_by_another_beat_is_a_takeover(beats: Callable[[str], Beat]) -> None:
    first = beats("b1")
    _until("b1 leads", lambda: first.leads)
    # another beat's token in the lease (in one write, so b1 cannot re-take it in between)
    first.ctx.redis.hset(first.ctx.keys.beat_leader(),
                         mapping={"token": "not-b1", "holder": "intruder"})
    _until("b1 sees the takeover", first.lost.is_set)
