"""A leader beat sends due jobs only on a lease it confirmed recently: cut off from Redis
(here: its Redis stopped with SIGSTOP, so renewals hang), it stops sending before the lease
can lapse and a standby take over; once renewals answer again it sends again.

The multihost partition test (tests/multihost) shows the same on a real network cut: before
this gate the cut-off leader sent the jobs that fell due during the cut after healing."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, ClassVar

import pytest

from app.celery_app import LeaderScheduler
from app.ops.checks import send_window
from app.storage import beat_guard
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis


def _wait(what: str, cond: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_leader_stops_sending_while_its_lease_cannot_be_confirmed_and_resumes(
        sqlite_url: str, own_redis: ThrowawayRedis) -> None:
    ctx = Context.from_settings(make_settings(
        sqlite_url, own_redis.url, "gate:", beat_lease_ttl_ms=1500, beat_lease_renew_ms=250,
        redis_socket_timeout_s=0.5))
    stop = threading.Event()
    try:
        assert not beat_guard.may_send(ctx)  # not leading yet
        token = beat_guard.lead(ctx, holder="host:1:beat", stop=stop, on_lost=stop.set)
        assert token is not None
        assert beat_guard.may_send(ctx)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # renewals hang from here on
        t0 = time.monotonic()
        _wait("the gate to close", lambda: not beat_guard.may_send(ctx))
        # closed before the lease could lapse (TTL 1.5 s after the last renewal)
        assert time.monotonic() - t0 < 1.5
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        _wait("the gate to open again", lambda: beat_guard.may_send(ctx))
    finally:
        stop.set()
        beat_guard._forget()
        ctx.close()


def _scheduler(monkeypatch: pytest.MonkeyPatch, job: str,
               period_ms: int) -> tuple[LeaderScheduler, type, list[Any]]:
    """A LeaderScheduler whose sends are recorded (Celery's own ``apply_entry`` replaced),
    an entry class for ``job`` and the list the sends go to."""
    sent: list[Any] = []
    monkeypatch.setattr("celery.beat.PersistentScheduler.apply_entry",
                        lambda self, entry, producer=None: sent.append(entry))

    class Entry:
        name = job
        options: ClassVar[dict[str, Any]] = {"queue": "q",
                                             "headers": {send_window.PERIOD: period_ms}}

    # apply_entry needs no scheduler state
    return LeaderScheduler.__new__(LeaderScheduler), Entry, sent


def test_the_scheduler_skips_a_due_job_while_the_gate_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sched, Entry, sent = _scheduler(monkeypatch, "handoff_health", 1000)
    monkeypatch.setattr("app.ops.run_locks.beat_may_send", lambda ctx: False)
    sched.apply_entry(Entry())
    assert sent == []
    monkeypatch.setattr("app.ops.run_locks.beat_may_send", lambda ctx: True)
    monkeypatch.setattr("app.ops.checks.send_window.redis_now_ms", lambda ctx: 12_345)
    sched.apply_entry(Entry())
    # sent, stamped with Redis's now beside its period; the schedule's own entry unchanged
    assert [e.name for e in sent] == ["handoff_health"]
    assert sent[0].options == {"queue": "q", "headers": {send_window.PERIOD: 1000,
                                                         send_window.SENT: 12_345}}
    assert Entry.options == {"queue": "q", "headers": {send_window.PERIOD: 1000}}


def test_the_scheduler_skips_a_job_when_the_gate_closed_while_it_read_redis_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The send-time stamp is a Redis call: a leader cut off right after its gate check
    gets the answer only once the network heals, with a fresh time, while a standby leads.
    The gate is asked again after the stamp, so that job is not sent (it would run twice)."""
    sched, Entry, sent = _scheduler(monkeypatch, "self_heal", 2000)
    gate = {"open": True}

    def clock_read_after_the_cut(ctx: Any) -> int:
        gate["open"] = False  # the lease went unconfirmed while this call waited
        return 99_000

    monkeypatch.setattr("app.ops.run_locks.beat_may_send", lambda ctx: gate["open"])
    monkeypatch.setattr("app.ops.checks.send_window.redis_now_ms", clock_read_after_the_cut)
    sched.apply_entry(Entry())
    assert sent == []
    assert gate == {"open": False}  # the stamp was read: the second check refused
