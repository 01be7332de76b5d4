"""Redis behind Sentinel (issue 22): the ``redis+sentinel://`` setting, what each client
builds from it, and a real failover -- a primary, a replica and three sentinels started
here, the primary killed after the replica stopped receiving its writes, the replica
promoted -- that every client follows, and whose lost run-lock fences its run's write.

The fleet-wide row (a primary's host cut, workers, beat and a Celery worker going on) is
``tests/multihost/test_sentinel_failover.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from app.celery_app import configure
from app.ops.checks import jobs
from app.ops.deployment import redis_identity
from app.redis_url import SentinelTarget, parse_sentinel
from app.settings import Settings
from app.storage import leader, locks, store
from app.storage.context import Context
from app.storage.db import transaction
from tests.sentinels import RedisGroup, wait_until
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]


# --- the setting --------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    t = parse_sentinel("redis+sentinel://:p%40ss@s1:26380,s2,[::1]:26381/cache/3"
                       "?sentinel_password=sp")
    assert t == SentinelTarget(sentinels=(("s1", 26380), ("s2", 26379), ("::1", 26381)),
                               master_name="cache", db=3, password="p@ss",
                               sentinel_password="sp")
    assert parse_sentinel("redis+sentinel://s1/cache").db == 0
    assert parse_sentinel("redis+sentinel://u:pw@s1/cache").username == "u"


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://:secret@s1:26379", "names the master"),
    ("redis+sentinel://:secret@/cache", "at least one sentinel"),
    ("redis+sentinel://:secret@s1:port/cache", "port is a number"),
    ("redis+sentinel://:secret@s1:70000/cache", "port is 1..65535"),
    ("redis+sentinel://:secret@s1/cache/zero", "path is /<master name>[/<db number>]"),
    ("redis+sentinel://:secret@s1/cache?master=x", "unknown Sentinel URL option"),
])
def test_a_malformed_sentinel_url_is_refused_in_one_line_without_the_password(
        url: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"(?i)sentinel"):
        Settings(redis_url=url)
    env = {**os.environ, "AUTONOMY_REDIS_URL": url,
           "AUTONOMY_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}
    for argv in ([str(REPO / ".venv" / "bin" / "autonomy"), "db", "deployment"],
                 [sys.executable, "-m", "celery", "-A", "app.celery_app", "inspect", "ping"]):
        out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2, out
        assert "error: invalid_settings: AUTONOMY_REDIS_URL: " in out.stderr, out.stderr
        assert says in out.stderr and "secret" not in out.stderr + out.stdout
        assert "Traceback" not in out.stderr


def test_celery_takes_the_sentinels_and_the_master_name_for_broker_and_backend() -> None:
    s = Settings(redis_url="redis+sentinel://:pw@s1:26379,s2:26380/cache/2"
                           "?sentinel_password=sp", redis_prefix="dep:")
    app = Celery("t", set_as_current=False)
    configure(app, s)
    want = "sentinel://:pw@s1:26379/2;sentinel://:pw@s2:26380/2"
    assert app.conf.broker_url == app.conf.result_backend == want
    for opts in (app.conf.broker_transport_options, app.conf.result_backend_transport_options):
        assert opts["master_name"] == "cache"
        assert opts["sentinel_kwargs"] == {"password": "sp"}
        assert opts["global_keyprefix"] == "dep:celery:"
    assert type(app.backend).__name__ == "SentinelBackend"
    # a result stored on a cut-off primary times out instead of hanging the pool process
    assert app.backend.connparams["socket_timeout"] == s.redis_socket_timeout_s


def test_a_sentinel_deployment_is_known_by_its_master_and_sentinels_not_its_primary() -> None:
    a = redis_identity("redis+sentinel://:pw@S2:26380,s1/cache/1")
    assert a == "sentinel:cache@s1:26379,s2:26380/1"
    assert redis_identity("redis+sentinel://:other@s1:26379,s2:26380/cache/1") == a
    assert redis_identity("redis+sentinel://127.0.0.1:26379/cache").startswith(
        "sentinel:cache@")
    assert "127.0.0.1:26379" in redis_identity("redis+sentinel://127.0.0.1:26379/cache")


# --- a real failover ------------------------------------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[tuple[RedisGroup, dict[str, subprocess.Popen[bytes]]]]:
    g = RedisGroup(tmp_path, password="pw-" + os.urandom(4).hex(),
                   primary=("127.0.0.1", free_port()), replica=("127.0.0.1", free_port()),
                   sentinels=[("127.0.0.1", free_port()) for _ in range(3)])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for node in g.nodes():
            log = (node.dir / "log").open("wb")
            procs[node.role] = subprocess.Popen(node.argv, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        wait_until("the primary, its replica and three sentinels to see each other",
                   g.ready, 60)
        yield g, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)


def test_every_client_follows_a_failover_and_a_run_whose_lock_was_lost_is_fenced(
        group: tuple[RedisGroup, dict[str, subprocess.Popen[bytes]]], sqlite_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run-lock of a run that started after the replica stopped hearing the primary
    is lost with the primary: its write is refused (``run_lock_fenced``); a lock taken
    before is still held on the promoted replica; the leader lease, the fast path and
    the plain client all answer from the new primary, found through the sentinels."""
    g, procs = group
    s = Settings(database_url=sqlite_url, redis_url=g.url, redis_prefix="sen:",
                 redis_socket_timeout_s=1.0, lock_heartbeat_interval_ms=100)
    ctx = Context.from_settings(s)
    try:
        _run_failover(g, procs, ctx, monkeypatch)
    finally:
        ctx.close()


def _run_failover(g: RedisGroup, procs: dict[str, subprocess.Popen[bytes]], ctx: Context,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    primary = g.client(g.primary, decode_responses=True)
    # before: a lock and the leader lease taken while the replica hears everything
    before = locks.acquire(ctx, "status", budget_ms=60_000, holder="before")
    lease, _ = leader.acquire(ctx, "beat-before")
    assert before and lease
    wait_until("the replica to have the lock", lambda: g.client(g.replica).exists(
        ctx.keys.lock("status")), 10)

    # the replica stops hearing the primary: what the primary takes from now on is lost
    procs["replica"].send_signal(signal.SIGSTOP)
    primary.client_kill_filter(_type="replica")
    started, go_on = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def check(_ctx: Context, _fence: Any) -> dict[str, Any]:
        started.set()
        assert go_on.wait(60)
        return {"ok": True}

    monkeypatch.setitem(jobs.CHECKS, "readiness", check)

    def run() -> None:
        try:
            outcome["answer"] = jobs.run_job(ctx, "readiness", holder="doomed")
        except Exception as e:
            outcome["error"] = e

    runner = threading.Thread(target=run, name="doomed-run")
    runner.start()
    try:
        assert started.wait(30), outcome
        assert primary.exists(ctx.keys.lock("readiness"))
        # the primary dies; the replica comes back and is promoted without the lock
        procs["primary"].kill()
        procs["primary"].wait(10)
        procs["replica"].send_signal(signal.SIGCONT)
        wait_until("Sentinel to promote the replica", g.promoted, 60)
    finally:
        go_on.set()
        runner.join(60)
    primary.close()

    # the run's record was refused: its lock is not on the new primary
    assert isinstance(outcome.get("error"), locks.RunLockLost), outcome
    with transaction(ctx.engine, write=False) as conn:
        fenced = [dict(e) for e in store.list_events(conn, kind="run_lock_fenced")]
    assert [e["data"]["refused"] for e in fenced] == ["the run's record"], fenced
    promoted = g.client(g.replica, decode_responses=True)
    assert not promoted.exists(ctx.keys.lock("readiness"))
    # what was replicated is still there, and its holder still holds it
    wait_until("the plain client to reach the new primary", lambda: _answers(ctx), 30)
    assert locks.holds(ctx, "status", before)
    assert leader.renew(ctx, lease) == leader.RENEWED
    # the fast path and the plain client write to the new primary, found by Sentinel
    ctx.fast_redis.set("sen:probe", "1")
    assert promoted.get("sen:probe") == "1"
    assert ctx.redis.connection_pool.get_master_address() == (g.replica.addr, g.replica.port)
    promoted.close()


def _answers(ctx: Context) -> bool:
    try:
        return bool(ctx.redis.ping())
    except Exception:
        return False
