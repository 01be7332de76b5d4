"""SPEC 4.7, "no process alive but silent": a real Celery worker and a real beat, as
subprocesses, against a Redis of the test's own that answers with an error.

- A worker started against a full Redis (``noeviction``: every write is ``OOM``) keeps
  retrying instead of exiting "Unrecoverable error: OutOfMemoryError", and runs the task
  that waited once Redis has room.
- A beat started against a read-only replica (``READONLY`` on every write) stays alive,
  says it cannot lead, and leads once the replica is promoted -- before, its
  ``beat_init`` handler raised, the leader logic never started and it logged "not sending
  ...: leader lease is not confirmed" forever.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.pools
import pytest
import redis
from celery import Celery

from app.celery_app import celery_key_prefix, configure
from app.clock import FrozenClock
from app.storage import leader
from app.storage.context import Context
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis, free_port
from tests.test_celery_e2e import Proc, _stored_results, _wait_for
from tests.test_redis_refusals import _fill

DEADLINE_S = 90.0


@pytest.fixture
def launcher(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    procs: list[Proc] = []

    def start(name: str, redis_url: str, queue: str, *args: str) -> Proc:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AUTONOMY_", "CELERY_", "FLOWER_"))
               and k not in ("DATABASE_URL", "REDIS_URL")}
        env.update({"DATABASE_URL": sqlite_url, "REDIS_URL": redis_url,
                    "AUTONOMY_REDIS_PREFIX": "t:", "AUTONOMY_CELERY_QUEUE": queue,
                    "AUTONOMY_BEAT_EVERY_S": "1", "AUTONOMY_BEAT_STANDBY_POLL_S": "0.2",
                    "PYTHONUNBUFFERED": "1"})
        p = Proc(name, [sys.executable, "-m", "celery", "-A", "app.celery_app", *args], env,
                 tmp_path / f"{name}.log")
        procs.append(p)
        return p

    yield start
    for p in reversed(procs):
        p.stop()


@pytest.mark.slow
def test_a_worker_started_against_a_full_redis_waits_and_runs_the_task_once_it_has_room(
        launcher: Any, sqlite_url: str) -> None:
    srv = ThrowawayRedis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    queue = f"oom-{uuid.uuid4().hex[:8]}"
    settings = make_settings(sqlite_url, srv.url, "t:", celery_queue=queue)
    client = Celery("autonomy-oom-client")
    configure(client, settings)
    # the worker stores the result and the test reads it from Redis; a client that awaited
    # it would keep a result subscription whose AsyncResult, collected after this test
    # stopped its Redis, retries that Redis from __del__ and fails whichever test runs then
    client.conf.result_backend = None
    r = redis.Redis.from_url(srv.url, decode_responses=True)
    try:
        sent = client.send_task("tasks.checks.status", queue=queue)
        _fill(srv.url)
        worker = launcher("worker", srv.url, queue, "worker", "--loglevel", "INFO",
                          "--concurrency", "1", "-n", f"{queue}@%h",
                          "--without-mingle", "--without-gossip")
        deadline = time.monotonic() + DEADLINE_S
        _wait_for("the worker to meet the OOM reply",
                  lambda: "maxmemory" in worker.output() or "OutOfMemory" in worker.output(),
                  [worker], deadline)
        assert worker.popen.poll() is None, worker.output()
        r.config_set("maxmemory", "0")  # room again
        prefix = celery_key_prefix(settings)
        done = _wait_for("the waiting task to run once Redis has room", lambda: next(
            (m for m in _stored_results(r, prefix) if m.get("task_id") == sent.id
             and m.get("status") in ("SUCCESS", "FAILURE")), None),
            [worker], deadline)
        assert done["status"] == "SUCCESS", done
        assert "Unrecoverable error" not in worker.output()
    finally:
        r.close()
        client.close()
        kombu.pools.reset()  # the client's producer pools (a process-wide registry)
        srv.stop()


@pytest.mark.slow
def test_a_beat_started_against_a_read_only_replica_leads_once_it_is_promoted(
        launcher: Any, sqlite_url: str, tmp_path: Path) -> None:
    srv = ThrowawayRedis("--replicaof", "127.0.0.1", str(free_port()))
    queue = f"ro-{uuid.uuid4().hex[:8]}"
    ctx = Context.from_settings(make_settings(sqlite_url, srv.url, "t:"), clock=FrozenClock())
    admin = redis.Redis.from_url(srv.url)
    try:
        beat = launcher("beat", srv.url, queue, "beat", "--loglevel", "INFO",
                        "--schedule", str(tmp_path / "beat-schedule"))
        deadline = time.monotonic() + DEADLINE_S
        _wait_for("the beat to say it cannot lead",
                  lambda: beat.output().count("cannot lead") >= 2, [beat], deadline)
        assert leader.view(ctx)["leader"] is None
        admin.execute_command("REPLICAOF", "NO", "ONE")
        lead = _wait_for("the beat to lead once Redis takes writes",
                         lambda: leader.view(ctx)["leader"], [beat], deadline)
        assert f":{beat.popen.pid}:" in lead
    finally:
        admin.close()
        ctx.close()
        srv.stop()
