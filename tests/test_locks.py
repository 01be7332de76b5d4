"""Run-locks on a real Redis: token-checked acquire/extend/release, the registry, and real
processes racing for, dying with and overrunning a lock."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.clock import FrozenClock
from app.errors import RedisUnavailable
from app.ops.checks import jobs
from app.storage import locks
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def lctx(sqlite_url: str, redis_server_url: str, redis_prefix: str, clock: FrozenClock
         ) -> Iterator[Context]:
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix),
                              clock=clock)
    yield c
    c.close()


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- one process -----------------------------------------------------------------------


def test_a_second_acquire_of_a_held_lock_gets_nothing(lctx: Context) -> None:
    token = locks.acquire(lctx, "handoff_health", budget_ms=1000, holder="a:1:x")
    assert token
    assert locks.acquire(lctx, "handoff_health", budget_ms=1000, holder="b:2:y") is None
    assert locks.acquire(lctx, "readiness", budget_ms=1000, holder="b:2:y")


def test_release_with_another_token_does_nothing(lctx: Context) -> None:
    token = locks.acquire(lctx, "status", budget_ms=1000)
    assert token
    assert locks.release(lctx, "status", "not-the-token") is False
    assert locks.extend(lctx, "status", "not-the-token") is False
    assert [lk["job"] for lk in locks.collect_run_locks(lctx)] == ["status"]
    assert locks.release(lctx, "status", token) is True
    assert locks.collect_run_locks(lctx) == []
    assert locks.release(lctx, "status", token) is False


def test_collect_lists_each_held_lock_with_elapsed_budget_and_liveness(
        lctx: Context, clock: FrozenClock) -> None:
    locks.acquire(lctx, "handoff_health", budget_ms=60_000, holder="h:1:a")
    clock.advance(seconds=1)
    locks.acquire(lctx, "self_heal", budget_ms=500, holder="h:2:b")
    clock.advance(seconds=2)
    got = {lk["job"]: lk for lk in locks.collect_run_locks(lctx)}
    assert got["handoff_health"] == {
        "job": "handoff_health", "holder": "h:1:a", "startedAt": got["handoff_health"]["startedAt"],
        "elapsedMs": 3000, "budgetMs": 60_000, "overBudget": False, "holderAlive": True}
    assert got["self_heal"]["elapsedMs"] == 2000 and got["self_heal"]["overBudget"] is True
    assert got["handoff_health"]["startedAt"].endswith("Z")


def test_extend_sets_the_ttl_to_budget_plus_grace(lctx: Context) -> None:
    token = locks.acquire(lctx, "status", budget_ms=1000)
    assert token
    assert locks.extend(lctx, "status", token, budget_ms=120_000)
    ttl = lctx.redis.pttl(lctx.keys.lock("status"))
    assert 120_000 < ttl <= 120_000 + lctx.settings.lock_grace_ms
    assert locks.collect_run_locks(lctx)[0]["budgetMs"] == 120_000


@pytest.fixture
def short_lctx(sqlite_url: str, redis_server_url: str, redis_prefix: str, clock: FrozenClock
               ) -> Iterator[Context]:
    """Locks that really expire within a test: no grace, so a lock lives its budget."""
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            lock_grace_ms=0), clock=clock)
    yield c
    c.close()


def test_an_expired_lock_is_not_listed_and_leaves_the_registry(short_lctx: Context) -> None:
    locks.acquire(short_lctx, "readiness", budget_ms=150)
    assert [lk["job"] for lk in locks.collect_run_locks(short_lctx)] == ["readiness"]
    _until(lambda: short_lctx.redis.exists(short_lctx.keys.lock("readiness")) == 0, 5,
           "the lock's TTL to run out")
    assert locks.collect_run_locks(short_lctx) == []
    assert locks.break_dead_locks(short_lctx) == []
    assert short_lctx.redis.zcard(short_lctx.keys.lock_registry()) == 0


def test_an_expired_lock_is_taken_over_and_its_old_holder_cannot_touch_it(
        short_lctx: Context, clock: FrozenClock) -> None:
    old = locks.acquire(short_lctx, "status", budget_ms=150, holder="old:1:x")
    assert old
    assert locks.acquire(short_lctx, "status", budget_ms=60_000, holder="new:2:y") is None
    _until(lambda: short_lctx.redis.exists(short_lctx.keys.lock("status")) == 0, 5,
           "the lock's TTL to run out")
    clock.advance(seconds=1)
    new = locks.acquire(short_lctx, "status", budget_ms=60_000, holder="new:2:y")
    assert new
    assert locks.extend(short_lctx, "status", old, budget_ms=99) is False
    assert locks.release(short_lctx, "status", old) is False
    [lk] = locks.collect_run_locks(short_lctx)
    assert (lk["holder"], lk["budgetMs"], lk["elapsedMs"], lk["holderAlive"]) == (
        "new:2:y", 60_000, 0, True)


def test_a_beat_never_outlives_its_lock(short_lctx: Context) -> None:
    token = locks.acquire(short_lctx, "self_heal", budget_ms=2_000)
    assert token
    k = short_lctx.keys
    # set in one script, the two may be a millisecond apart; the default beat TTL is 10 s.
    # Both read in one MULTI, so a loaded machine cannot put time between the two reads.
    beat_ttl, lock_ttl = (short_lctx.redis.pipeline(transaction=True)
                          .pttl(k.lock_beat("self_heal")).pttl(k.lock("self_heal")).execute())
    assert beat_ttl <= lock_ttl + 1 <= 2_001
    assert locks.extend(short_lctx, "self_heal", token, budget_ms=3_000)
    assert 2_000 < short_lctx.redis.pttl(k.lock_beat("self_heal")) <= 3_000


def test_break_dead_locks_breaks_only_locks_whose_holder_stopped_beating(
        lctx: Context, clock: FrozenClock) -> None:
    locks.acquire(lctx, "self_heal", budget_ms=10, holder="dead:1:x")
    locks.acquire(lctx, "status", budget_ms=10, holder="slow:2:y")
    clock.advance(seconds=5)  # both over budget
    lctx.redis.delete(lctx.keys.lock_beat("self_heal"))  # its holder stopped beating
    broken = locks.break_dead_locks(lctx)
    assert [(b["job"], b["holder"], b["holderAlive"]) for b in broken] == [
        ("self_heal", "dead:1:x", False)]
    [left] = locks.collect_run_locks(lctx)
    assert left["job"] == "status" and left["overBudget"] and left["holderAlive"]


def test_held_raises_already_running_with_holder_and_elapsed(
        lctx: Context, clock: FrozenClock) -> None:
    with locks.held(lctx, "readiness", budget_ms=1000, holder="first:1:a") as h:
        clock.advance(seconds=4)
        with (pytest.raises(locks.AlreadyRunning) as e,
              locks.held(lctx, "readiness", budget_ms=1000, holder="second:2:b")):
            pytest.fail("a second run must not start")
        assert e.value.holder == "first:1:a" and e.value.elapsed_ms == 4000
        assert e.value.to_wire()["error"] == "already_running"
        assert not h.lost
    assert locks.collect_run_locks(lctx) == []


def test_a_dead_holders_lock_is_listed_as_not_alive_until_it_is_broken(
        lctx: Context, clock: FrozenClock) -> None:
    locks.acquire(lctx, "readiness", budget_ms=60_000, holder="gone:1:x")
    clock.advance(seconds=3)
    lctx.redis.delete(lctx.keys.lock_beat("readiness"))  # its holder stopped beating
    [lk] = locks.collect_run_locks(lctx)
    assert lk == {"job": "readiness", "holder": "gone:1:x", "startedAt": lk["startedAt"],
                  "elapsedMs": 3000, "budgetMs": 60_000, "overBudget": False,
                  "holderAlive": False}
    assert locks.acquire(lctx, "readiness", budget_ms=1000) is None  # still held
    assert locks.break_dead_locks(lctx) == [lk]
    assert locks.collect_run_locks(lctx) == []
    assert locks.acquire(lctx, "readiness", budget_ms=1000)


def test_a_released_job_leaves_the_registry_on_the_next_walk(lctx: Context) -> None:
    token = locks.acquire(lctx, "status", budget_ms=1000)
    assert token and locks.release(lctx, "status", token)
    assert lctx.redis.zcard(lctx.keys.lock_registry()) == 1  # a release is two commands
    assert locks.collect_run_locks(lctx) == []
    assert lctx.redis.zcard(lctx.keys.lock_registry()) == 0


def test_many_locks_are_listed_oldest_first_and_only_the_dead_are_broken(
        lctx: Context, clock: FrozenClock) -> None:
    jobs = [f"job-{i:03d}" for i in range(100)]  # more than one piece of the walk's answer
    for i, job in enumerate(reversed(jobs)):  # the last job is the oldest
        assert locks.acquire(lctx, job, budget_ms=50 * i, holder=f"h:{i}:t")
        clock.advance(milliseconds=10)
    dead = set(jobs[::7])
    for job in dead:
        lctx.redis.delete(lctx.keys.lock_beat(job))
    listed = locks.collect_run_locks(lctx)
    assert [lk["job"] for lk in listed] == list(reversed(jobs))
    assert {lk["job"] for lk in listed if not lk["holderAlive"]} == dead
    assert [lk["elapsedMs"] for lk in listed] == [10 * (100 - i) for i in range(100)]
    assert all(lk["overBudget"] == (lk["elapsedMs"] > lk["budgetMs"]) for lk in listed)
    assert sorted(b["job"] for b in locks.break_dead_locks(lctx)) == sorted(dead)
    assert [lk["job"] for lk in locks.collect_run_locks(lctx)] == [
        job for job in reversed(jobs) if job not in dead]


def test_extend_with_a_new_budget_moves_the_over_budget_line(
        lctx: Context, clock: FrozenClock) -> None:
    token = locks.acquire(lctx, "handoff_health", budget_ms=1000)
    assert token
    clock.advance(seconds=2)
    [lk] = locks.collect_run_locks(lctx)
    assert (lk["elapsedMs"], lk["budgetMs"], lk["overBudget"]) == (2000, 1000, True)
    assert locks.extend(lctx, "handoff_health", token, budget_ms=5000)
    assert locks.beat(lctx, "handoff_health", token)  # a beat keeps the new budget
    [lk] = locks.collect_run_locks(lctx)
    assert (lk["elapsedMs"], lk["budgetMs"], lk["overBudget"]) == (2000, 5000, False)


def test_jobs_and_holders_with_quotes_and_unicode_are_listed_verbatim(
        lctx: Context, clock: FrozenClock) -> None:
    job, holder = 'we"ird \\ job: "budgetMs":1,"overBudget":2 ü', 'h "1" ✓:*:{}'
    token = locks.acquire(lctx, job, budget_ms=1000, holder=holder)
    assert token
    assert locks.extend(lctx, job, token, budget_ms=7000)
    clock.advance(seconds=1)
    [lk] = locks.collect_run_locks(lctx)
    assert (lk["job"], lk["holder"], lk["budgetMs"], lk["elapsedMs"]) == (
        job, holder, 7000, 1000)
    with pytest.raises(locks.AlreadyRunning) as e, locks.held(lctx, job, budget_ms=1):
        pytest.fail("held")
    assert (e.value.holder, e.value.elapsed_ms) == (holder, 1000)
    assert locks.release(lctx, job, token)


def test_threads_sharing_a_context_take_turns_on_its_connection(lctx: Context) -> None:
    errors: list[BaseException] = []

    def cycles(job: str) -> None:
        try:
            for _ in range(300):
                token = locks.acquire(lctx, job, budget_ms=1000)
                assert token and locks.extend(lctx, job, token)
                assert locks.release(lctx, job, token)
                locks.collect_run_locks(lctx)
        except BaseException as e:  # surfaced below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=cycles, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_lock_connection_killed_by_the_server_is_replaced(lctx: Context) -> None:
    token = locks.acquire(lctx, "status", budget_ms=1000)
    assert token
    # the pool hands back the connection it took last: the one the next script runs on
    lctx.redis.client_kill_filter(_id=lctx.redis.client_id())
    assert locks.release(lctx, "status", token)  # reconnected under the client's retry
    assert locks.collect_run_locks(lctx) == []


def test_redis_down_is_redis_unavailable(sqlite_url: str, redis_prefix: str) -> None:
    down = Context.from_settings(make_settings(
        sqlite_url, f"redis://127.0.0.1:{free_port()}/0", redis_prefix,
        redis_socket_timeout_s=1))
    try:
        with pytest.raises(RedisUnavailable):
            locks.acquire(down, "status", budget_ms=1000)
        with pytest.raises(RedisUnavailable):
            locks.collect_run_locks(down)
    finally:
        down.close()


# --- real processes ----------------------------------------------------------------------


def _contend(settings_kw: dict[str, Any], job: str, ready: Any, go: Any, ran: Any,
             skipped: Any) -> None:
    ctx = Context.from_settings(make_settings(**settings_kw))
    ctx.redis.ping()  # connected before the start signal
    with ready.get_lock():
        ready.value += 1
    go.wait()
    try:
        with locks.held(ctx, job, budget_ms=5_000):
            with ran.get_lock():
                ran.value += 1
            time.sleep(2.0)  # still running while every other process tries
    except locks.AlreadyRunning:
        with skipped.get_lock():
            skipped.value += 1
    finally:
        ctx.close()


@pytest.mark.slow
def test_many_processes_starting_the_same_job_at_once_run_it_exactly_once(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    mpc = mp.get_context("spawn")
    n = 16
    go, ready = mpc.Event(), mpc.Value("i", 0)
    ran, skipped = mpc.Value("i", 0), mpc.Value("i", 0)
    kw = {"database_url": sqlite_url, "redis_url": redis_server_url, "prefix": redis_prefix}
    procs = [mpc.Process(target=_contend,
                         args=(kw, "handoff_health", ready, go, ran, skipped))
             for _ in range(n)]
    for p in procs:
        p.start()
    _until(lambda: ready.value == n, 60, "every process to connect")
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    print(f"\n[run-lock race] {n} processes: ran {ran.value}, skipped {skipped.value}")
    assert ran.value == 1 and skipped.value == n - 1


_HOLDER = """
import sys, time
from app.storage import locks
from app.storage.context import Context
from tests.conftest import make_settings
db, url, prefix, job, budget = sys.argv[1:6]
ctx = Context.from_settings(make_settings(db, url, prefix, lock_heartbeat_interval_ms=100,
                                          lock_holder_dead_after_ms=600))
with locks.held(ctx, job, budget_ms=int(budget), holder=f"child:{job}") as h:
    print("held", flush=True)
    time.sleep(30)
"""


def _holder(sqlite_url: str, redis_url: str, prefix: str, job: str, budget_ms: int
            ) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, sqlite_url, redis_url, prefix, job,
                          str(budget_ms)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


@pytest.fixture
def real_lctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            lock_holder_dead_after_ms=600))
    yield c
    c.close()


@contextmanager
def _self_heal_holder(ctx: Context, sqlite_url: str, redis_url: str, prefix: str
                      ) -> Iterator[Callable[[], None]]:
    """A process holding self_heal's lock; the block gets ``kill()``: SIGKILL it and wait
    for its heartbeat to lapse."""
    p = _holder(sqlite_url, redis_url, prefix, "self_heal", 60_000)

    def kill() -> None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        _until(lambda: not locks.collect_run_locks(ctx)[0]["holderAlive"], 10,
               "the killed holder's heartbeat to lapse")

    try:
        yield kill
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        assert p.stdout is not None
        p.stdout.close()


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_shows_dead_and_its_lock_is_broken(
        real_lctx: Context, sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    with _self_heal_holder(real_lctx, sqlite_url, redis_server_url, redis_prefix) as kill:
        [lk] = locks.collect_run_locks(real_lctx)
        assert lk["holderAlive"] is True and lk["holder"] == "child:self_heal"
        assert locks.break_dead_locks(real_lctx) == []  # alive: left alone
        kill()
        assert locks.acquire(real_lctx, "self_heal", budget_ms=1000) is None  # still held
        broken = locks.break_dead_locks(real_lctx)
        assert [b["holder"] for b in broken] == ["child:self_heal"]
        assert locks.acquire(real_lctx, "self_heal", budget_ms=1000)  # the next run proceeds


@pytest.mark.slow
def test_a_self_heal_killed_mid_run_does_not_hold_the_next_one_off(
        real_lctx: Context, sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    with _self_heal_holder(real_lctx, sqlite_url, redis_server_url, redis_prefix) as kill:
        assert jobs.run_job(real_lctx, "self_heal")["skipped"] == "already_running"  # alive
        kill()
        r = jobs.run_job(real_lctx, "self_heal")  # well inside the dead lock's 90 s TTL
        assert "skipped" not in r and r["ok"] is True
        assert locks.collect_run_locks(real_lctx) == []


@pytest.mark.slow
def test_a_slow_but_alive_holder_over_budget_is_reported_and_left_alone(
        real_lctx: Context, sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    p = _holder(sqlite_url, redis_server_url, redis_prefix, "readiness", 200)
    try:
        _until(lambda: locks.collect_run_locks(real_lctx)[0]["overBudget"], 10,
               "the holder to pass its budget")
        time.sleep(1.0)  # longer than the beat TTL: only its heartbeat keeps it alive
        assert locks.break_dead_locks(real_lctx) == []
        [lk] = locks.collect_run_locks(real_lctx)
        assert lk["overBudget"] is True and lk["holderAlive"] is True
        assert lk["elapsedMs"] > lk["budgetMs"]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        assert p.stdout is not None
        p.stdout.close()
