"""SPEC 4.7: a Redis that answers with an error is as good as a Redis that is down.

Each test starts its own redis-server made to refuse in one real way -- full under
``noeviction`` (``OOM``), a replica of a master that is gone (``READONLY``), a password
required (``NOAUTH``) or a wrong one given (``WRONGPASS``), protected mode seen from a
non-loopback address (``DENIED``), a failed save (``MISCONF``), a script that never
ends (``BUSY``) -- and shows that claims,
heartbeats and completes answer from the database alone with the same answers and
guards, that nothing answers 5xx or ``internal_error`` (after a commit above all), that
``/readyz`` answers 503 naming Redis, and that a beat leads once Redis is fixed. Never the
shared Redis: only the test's own servers are configured or filled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from app import ops
from app.api import metrics
from app.clock import FrozenClock
from app.ops import lanes
from app.ops.checks import readiness, state
from app.storage import beat_guard, leader, leases, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.redis_conn import RedisHealth
from app.storage.redis_errors import describe, is_timeout, is_unavailable, reply_code
from tests.api_server import client
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis, free_port, non_loopback_address
from tests.test_redis_degraded import _lane_round

PASSWORD = "s3cret-for-tests"


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)


def _fill(url: str) -> None:
    """Fill a ``--maxmemory`` Redis with another app's keys until it refuses writes, then
    hold it full: its ``maxmemory`` set below what it holds, as when an operator lowers it
    under a full server. Memory ebbs after a refusal (buffers freed), so a server filled to
    the brim alone may take the next small write; on a loaded machine it did, 100 times
    over (issue 24: "the Redis never stayed full")."""
    c = redis.Redis.from_url(url)
    try:
        for batch in range(10_000):
            pipe = c.pipeline(transaction=False)
            for i in range(200):
                pipe.set(f"other-app:{batch}:{i}", "x" * 512)
            try:
                pipe.execute()
            except redis.exceptions.OutOfMemoryError:
                break
        else:
            raise AssertionError("the Redis never refused a write")
        used = int(c.info("memory")["used_memory"])
        c.config_set("maxmemory", str(used // 2))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            c.set("other-app:probe", "x")
    finally:
        c.close()


def _fail_saves(server: ThrowawayRedis) -> None:
    """A Redis whose last background save failed refuses writes (``MISCONF``): its data
    directory is removed under it, then a save is asked for."""
    c = redis.Redis.from_url(server.url)
    try:
        shutil.rmtree(server.dir)
        c.bgsave()
        _until(lambda: c.info("persistence").get("rdb_last_bgsave_status") == "err",
               "the background save to fail")
    finally:
        c.close()


@dataclass
class Refusing:
    """A redis-server of the test's own that refuses the fleet in one way, ``url`` the
    address the fleet is given; ``fix()`` makes it serve again."""

    kind: str
    server: ThrowawayRedis
    url: str
    fix: Callable[[], None]


def _admin(server: ThrowawayRedis, password: str | None = None) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=password)


def _start(kind: str) -> Refusing:
    if kind == "oom":
        srv = ThrowawayRedis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
        try:
            _fill(srv.url)
        except BaseException:
            srv.stop()
            raise
        return Refusing(kind, srv, srv.url, lambda: _admin(srv).config_set("maxmemory", "0"))
    if kind == "readonly":
        srv = ThrowawayRedis("--replicaof", "127.0.0.1", str(free_port()))
        return Refusing(kind, srv, srv.url, lambda: _admin(srv).execute_command(
            "REPLICAOF", "NO", "ONE"))
    if kind in ("noauth", "wrongpass"):
        srv = ThrowawayRedis("--requirepass", PASSWORD,
                             ready_url=f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0")
        if kind == "noauth":  # fixed: the password requirement lifted
            return Refusing(kind, srv, srv.url, lambda: _admin(srv, PASSWORD).config_set(
                "requirepass", ""))
        # fixed: the server given the password the fleet has
        return Refusing(kind, srv, f"redis://:wrong@127.0.0.1:{srv.port}/0",
                        lambda: _admin(srv, PASSWORD).config_set("requirepass", "wrong"))
    if kind == "denied":
        srv = ThrowawayRedis("--protected-mode", "yes", bind=None)
        return Refusing(kind, srv, f"redis://{non_loopback_address()}:{srv.port}/0",
                        lambda: _admin(srv).config_set("protected-mode", "no"))
    if kind == "misconf":
        srv = ThrowawayRedis("--save", "3600", "1")
        try:
            _fail_saves(srv)
        except BaseException:
            srv.stop()
            raise
        return Refusing(kind, srv, srv.url, lambda: _admin(srv).config_set(
            "stop-writes-on-bgsave-error", "no"))
    if kind == "busy":
        srv = ThrowawayRedis("--lua-time-limit", "10")
        _run_forever(srv)
        return Refusing(kind, srv, srv.url, lambda: _admin(srv).script_kill())
    raise AssertionError(kind)


def _run_forever(server: ThrowawayRedis) -> None:
    """A script that never ends: past ``lua-time-limit`` Redis answers every other
    command ``BUSY`` until ``SCRIPT KILL``."""
    runner = redis.Redis.from_url(server.url)

    def spin() -> None:
        with contextlib.suppress(redis.RedisError):  # killed: "Script killed by user"
            runner.eval("while true do end", 0)
        runner.close()

    threading.Thread(target=spin, name="busy-script", daemon=True).start()
    probe = redis.Redis.from_url(server.url)

    def busy() -> bool:
        try:
            probe.ping()
            return False
        except redis.ResponseError as e:
            return str(e).startswith("BUSY") or getattr(e, "status_code", None) == "BUSY"

    try:
        _until(busy, "Redis to answer BUSY")
    finally:
        probe.close()


KINDS = ["oom", "readonly", "noauth", "wrongpass", "denied", "misconf", "busy"]


@pytest.fixture(params=KINDS)
def refusing(request: pytest.FixtureRequest) -> Iterator[Refusing]:
    r = _start(str(request.param))
    yield r
    if r.kind == "misconf":  # else its shutdown save fails and it will not exit
        _admin(r.server).config_set("save", "")
    if r.kind == "busy":  # a Redis running a script does not stop on SIGTERM
        with contextlib.suppress(redis.RedisError):
            _admin(r.server).script_kill()
    r.server.stop()


def _ctx(database_url: str, url: str, clock: FrozenClock | None = None,
         **overrides: Any) -> Context:
    s = make_settings(database_url, url, "t:", redis_fast_path_timeout_ms=200,
                      redis_socket_timeout_s=2, **overrides)
    return Context.from_settings(s, clock=clock or FrozenClock())


def _gauge(payload: dict[str, Any], name: str) -> list[str]:
    text = metrics.render(payload).decode()
    return [ln for ln in text.splitlines() if ln.startswith(name)]


# --- the classification ---------------------------------------------------------------


@pytest.mark.parametrize("reply", [
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "NOAUTH Authentication required.",
    "WRONGPASS invalid username-password pair or user is disabled.",
    "NOPERM this user has no permissions to run the 'set' command",
    "DENIED Redis is running in protected mode because protected mode is enabled",
    "LOADING Redis is loading the dataset in memory",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "UNBLOCKED force unblock from blocking operation, instance state changed (master -> "
    "replica?)",
    "ERR Error running script (call to f_3c6e): @user_script:1: @user_script: 1: "
    "-READONLY You can't write against a read only replica.",
    "ERR Error running script (call to f_3c6e): @user_script:2: -OOM command not allowed",
])
def test_every_error_reply_that_means_redis_cannot_serve_is_unavailable(reply: str) -> None:
    """As redis-py's parser raises them (with the reply's code), from a plain command or
    relayed from inside a Lua script."""
    from redis._parsers.base import BaseParser

    e = BaseParser.parse_error(reply)
    assert is_unavailable(e), (type(e), e)
    assert reply_code(e) in reply
    assert reply_code(e) in describe(e)


@pytest.mark.parametrize("err", [
    redis.ConnectionError("Error -2 connecting to redis:6379. Name or service not known."),
    redis.TimeoutError("Timeout reading from socket"),
    OSError(104, "Connection reset by peer"),
    socket.gaierror(-2, "Name or service not known"),
    __import__("ssl").SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
])
def test_no_answer_dns_failure_and_tls_errors_are_unavailable(err: Exception) -> None:
    assert is_unavailable(err)


@pytest.mark.parametrize("reply", [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR Error running script (call to f_1): @user_script:3: user_script:3: bad argument",
    "ERR unknown command 'FOO'",
])
def test_an_error_reply_that_is_a_bug_is_not_an_outage(reply: str) -> None:
    from redis._parsers.base import BaseParser

    assert not is_unavailable(BaseParser.parse_error(reply))


# --- the fleet against a refusing Redis -------------------------------------------------


def test_claims_heartbeats_and_completes_answer_from_the_database_while_redis_refuses(
        database_url: str, refusing: Refusing) -> None:
    """Before: OOM/READONLY/DENIED/MISCONF escaped as ``ResponseError`` (a claim that had
    committed its lease then answered an error: the task sat leased to nobody)."""
    ctx = _ctx(database_url, refusing.url, redis_reprobe_first_ms=1, redis_reprobe_max_ms=1)
    try:
        _lane_round(ctx)
        assert ctx.redis_health.degraded
        status = ops.dispatch(ctx, {"action": "status"})
        assert status["redis"] == "degraded"
        assert status["workflowHealth"]["error"] == "redis_unavailable"
        assert _gauge(status, "autonomy_redis_degraded ") == ["autonomy_redis_degraded 1.0"]
        with transaction(ctx.engine, write=False) as conn:
            leased = store.in_progress(conn, assignee="coder")
        # the only lease is w2's, answered to w2: nothing leased to nobody
        assert [t["claimed_by"] for t in leased] == ["w2"]
        refusing.fix()
        _until(lambda: ops.dispatch(ctx, {"action": "status"})["redis"] == "ok",
               f"status redis ok once the {refusing.kind} Redis is fixed")
    finally:
        ctx.close()


def test_over_http_nothing_answers_5xx_after_a_commit_and_readyz_is_503_naming_redis(
        sqlite_url: str, refusing: Refusing) -> None:
    """Before, against a Redis answering DENIED: a create answered 500 after it had
    committed the task, and ``/readyz`` answered 500."""
    ctx = _ctx(sqlite_url, refusing.url)
    try:
        with client(ctx) as http:
            made = http.post("/api/autonomy", json={"action": "create", "assignee": "coder",
                                                    "title": "a"})
            assert made.status_code == 200, made.text
            got = http.post("/api/autonomy", json={"action": "claim", "assignee": "coder",
                                                   "worker": "w1"})
            assert got.status_code == 200 and got.json()["lease"], got.text
            done = http.post("/api/autonomy", json={
                "action": "complete", "taskId": got.json()["task"]["id"],
                "leaseToken": got.json()["lease"]["token"], "outcome": "success"})
            assert done.status_code == 200 and done.json()["task"]["status"] == "done"
            ready = http.get("/readyz")
            assert ready.status_code == 503, ready.text
            body = ready.json()
            assert body["redis"] == "degraded" and body["failed"] == ["redis"]
            assert "redis" in body["message"].lower()
            status = http.get("/api/autonomy/status")
            assert status.status_code == 200 and status.json()["redis"] == "degraded"
    finally:
        ctx.close()


def test_a_beat_that_meets_a_refusing_redis_at_start_leads_once_it_is_fixed(
        sqlite_url: str, refusing: Refusing, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the first ``ResponseError`` (DENIED, READONLY, OOM...) escaped ``lead`` --
    Celery's ``beat_init`` logged it and the beat never led, for good."""
    ctx = _ctx(sqlite_url, refusing.url, beat_standby_poll_s=0.05)
    stop = threading.Event()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(beat_guard.lead(
        ctx, holder="h1:1:beat", stop=stop, on_lost=lambda: None)), daemon=True)
    t.start()
    try:
        # it cannot lead while Redis refuses, and is still trying (alive, not silent)
        caplog.set_level(logging.WARNING, logger="app.storage.beat_guard")
        _until(lambda: not t.is_alive() or sum(
            "cannot lead now" in r.getMessage() for r in caplog.records) >= 2,
            "the beat to try twice and say it cannot lead")
        assert t.is_alive() and not got
        assert not beat_guard.may_send(ctx)
        refusing.fix()
        _until(lambda: bool(got), f"the beat to lead once the {refusing.kind} Redis is fixed")
        assert got[0] is not None
        assert leader.view(ctx)["leader"] == "h1:1:beat"
        assert beat_guard.may_send(ctx)
    finally:
        stop.set()
        t.join(10)
        with contextlib.suppress(Exception):
            if got and got[0]:
                leader.release(ctx, got[0])
        beat_guard._forget()
        ctx.close()


# --- busy is not down --------------------------------------------------------------------


def test_one_slow_answer_from_a_busy_redis_does_not_degrade_the_fleet(
        sqlite_url: str, own_redis: ThrowawayRedis) -> None:
    """Issue 22: the 250 ms deadline tripped under machine load and flipped the fleet to
    degraded. Redis here answers one call late (``DEBUG SLEEP`` just past the deadline):
    that call goes to the database, the fleet stays on the fast path."""
    ctx = _ctx(sqlite_url, own_redis.url)
    sleeper = redis.Redis.from_url(own_redis.url, socket_timeout=10)
    watcher = redis.Redis.from_url(own_redis.url, socket_timeout=0.05)
    try:
        lanes.create(ctx, assignee="coder", title="a")
        assert ops.dispatch(ctx, {"action": "status"})["redis"] == "ok"
        t = threading.Thread(target=lambda: sleeper.execute_command("DEBUG", "SLEEP", "0.35"))
        t.start()

        def asleep() -> bool:
            try:
                watcher.ping()
                return False
            except redis.TimeoutError:
                return True

        _until(asleep, "Redis to be busy")
        answer = lanes.claim(ctx, assignee="coder", worker="w1")
        assert answer["lease"]
        t.join(10)
        assert not ctx.redis_health.degraded
        assert ops.dispatch(ctx, {"action": "status"})["redis"] == "ok"
    finally:
        sleeper.close()
        watcher.close()
        ctx.close()


def test_a_stalled_redis_is_degraded_within_a_second(
        sqlite_url: str, own_redis: ThrowawayRedis) -> None:
    """SIGSTOP: every call misses its deadline, so two in a row (the status probe asks
    twice) make it degraded -- the claims after it go to the database at once."""
    ctx = _ctx(sqlite_url, own_redis.url)
    try:
        lanes.create(ctx, assignee="coder", title="a")
        assert ops.dispatch(ctx, {"action": "status"})["redis"] == "ok"
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert leases.probe(ctx) is False
        took = time.monotonic() - t0
        assert ctx.redis_health.degraded, "a stalled Redis must be degraded"
        assert took < 1.0, f"degraded only after {took:.2f} s"
        assert lanes.claim(ctx, assignee="coder", worker="w1")["lease"]
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        ctx.close()


def test_redis_health_degrades_on_consecutive_misses_and_at_once_on_a_refusal() -> None:
    h = RedisHealth(first_ms=100_000, max_ms=100_000, misses=2)
    late = redis.TimeoutError("Timeout reading from socket")
    assert is_timeout(late)
    h.failed(late)
    assert not h.degraded
    h.ok()  # an answer in between: the count starts again
    h.failed(late)
    assert not h.degraded
    h.failed(late)
    assert h.degraded
    h.ok()
    h.failed(redis.exceptions.OutOfMemoryError("command not allowed"))
    assert h.degraded


# --- eviction ------------------------------------------------------------------------------


@pytest.mark.parametrize("evicting", ["allkeys-lru", "volatile-lru"])
def test_status_readyz_and_metrics_name_an_evicting_maxmemory_policy(
        sqlite_url: str, evicting: str) -> None:
    """``volatile-*`` too: every key of the fleet carries a TTL, so a Redis full of another
    app's keys evicts run-locks and the beat lease first (the fault suite's volatile-lru
    row saw it: run-locks gone, the beat lease taken over)."""
    srv = ThrowawayRedis("--maxmemory", "64mb", "--maxmemory-policy", evicting)
    ctx = _ctx(sqlite_url, srv.url)
    try:
        status = ops.dispatch(ctx, {"action": "status"})
        mem = status["redisMemory"]
        assert mem["maxmemoryPolicy"] == evicting and mem["evictsFleetKeys"] is True
        assert evicting in mem["warning"] and "noeviction" in mem["warning"]
        assert _gauge(status, "autonomy_redis_evicts_fleet_keys") == [
            f'autonomy_redis_evicts_fleet_keys{{policy="{evicting}"}} 1.0']
        with client(ctx) as http:
            body = http.get("/readyz").json()
        assert body["ok"] is True and body["redisMaxmemoryPolicy"] == evicting
        assert evicting in body["warnings"][0]
    finally:
        ctx.close()
        srv.stop()


def test_a_non_evicting_policy_is_shown_and_not_warned_about(
        sqlite_url: str, own_redis: ThrowawayRedis) -> None:
    ctx = _ctx(sqlite_url, own_redis.url)
    try:
        status = ops.dispatch(ctx, {"action": "status"})
        assert status["redisMemory"]["maxmemoryPolicy"] == "noeviction"
        assert status["redisMemory"]["evictsFleetKeys"] is False
        assert status["redisMemory"]["warning"] is None
        assert _gauge(status, "autonomy_redis_evicts_fleet_keys") == [
            'autonomy_redis_evicts_fleet_keys{policy="noeviction"} 0.0']
    finally:
        ctx.close()


# --- readiness on a corrupt handoff snapshot ---------------------------------------------


@pytest.mark.parametrize("raw", ['{"state": "GO', '["GO"]', '{"state": 7}'])
def test_readiness_is_never_go_on_an_unreadable_handoff_snapshot(ctx: Context,
                                                                raw: str) -> None:
    """Before: ``autonomy check readiness`` answered ``state: GO, handoffState: null``."""
    with transaction(ctx.engine) as conn:
        store.write_check_state(conn, name=state.HANDOFF, data=raw, now=ctx.clock())
    r = readiness.run_readiness(ctx)
    assert r["state"] == "NO_GO"
    assert r["handoffError"] and r["handoffError"] != "missing"
    assert ops.dispatch(ctx, {"action": "status"})["readiness"]["state"] == "NO_GO"


def test_readiness_before_any_handoff_run_names_the_missing_snapshot(ctx: Context) -> None:
    r = readiness.run_readiness(ctx)
    assert r["state"] == "GO" and r["handoffError"] == "missing"
