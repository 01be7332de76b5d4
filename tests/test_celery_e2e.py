"""The Celery app's configuration, and the periodic checks end to end: a real Celery
worker and a real beat, as subprocesses, against the real Redis (a key prefix and queue of
this test's own) and a SQLite file.

Beat fires every job each second; ``readiness`` is kept running 12 s, so while it holds its
run-lock the status task's stored result lists that lock (holder alive), a second
``readiness`` run is answered ``skipped: "already_running"``, and the worker answers
``celery inspect run_locks`` with the held lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import kombu.pools
import pytest
import redis
from celery import Celery

import beat_schedule
from app.celery_app import build_beat_schedule, celery_key_prefix, configure
from app.local.flower import refuse_open_flower
from app.ops.checks import send_window
from app.settings import Settings
from tasks.checks import payload_of
from tests.conftest import make_settings
from tests.servers import live_in_group

REPO = Path(__file__).resolve().parent.parent
JOBS = ("handoff_health", "readiness", "self_heal", "status", "retention")
READINESS_HOLD_MS = 12_000
DEADLINE_S = 50.0


class Proc:
    """A subprocess in its own process group, with its output in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL whatever is left after 5 s, wait until none lives."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)
            if self._gone_within(5.0):
                break
        self.popen.wait(5)
        self._out.close()

    def _gone_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.popen.poll() is not None and not live_in_group(self.pgid):
                return True
            time.sleep(0.1)
        return False


@pytest.fixture
def e2e(tmp_path: Path, sqlite_url: str, redis_server_url: str,
        redis_prefix: str) -> Iterator[dict[str, Any]]:
    """Environment, a client Celery app and a process launcher; everything killed after."""
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    settings = make_settings(sqlite_url, redis_server_url, redis_prefix, celery_queue=queue)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTONOMY_", "CELERY_", "FLOWER_"))
           and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({
        "DATABASE_URL": sqlite_url,
        "REDIS_URL": redis_server_url,
        "AUTONOMY_REDIS_PREFIX": redis_prefix,
        "AUTONOMY_CELERY_QUEUE": queue,
        "AUTONOMY_BEAT_EVERY_S": "1",
        "AUTONOMY_JOB_MIN_RUNTIME_MS": json.dumps({"readiness": READINESS_HOLD_MS}),
        "PYTHONUNBUFFERED": "1",
    })
    client = Celery("autonomy-e2e-client")
    configure(client, settings)
    procs: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        p = Proc(name, [sys.executable, "-m", "celery", "-A", "app.celery_app", *args], env,
                 tmp_path / f"{name}.log")
        procs.append(p)
        return p

    yield {"env": env, "client": client, "start": start, "tmp": tmp_path,
           "prefix": celery_key_prefix(settings), "redis_url": redis_server_url}
    for p in reversed(procs):
        p.stop()
    for p in procs:
        assert not live_in_group(p.pgid), f"{p.name} left processes behind"
    client.close()
    # kombu keeps every connection's producer pool in a process-wide registry that the
    # app's close leaves open: without this each test left ~8 sockets and pollers behind
    kombu.pools.reset()


def _stored_results(r: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every task result the backend stored under this test's prefix."""
    keys = list(r.scan_iter(match=f"{prefix}celery-task-meta-*", count=1000))
    metas = [json.loads(v) for v in r.mget(keys) if v] if keys else []
    return metas


STALL_S = 5.0  # a pass of the wait loop longer than this: the test process did not run
STALL_CREDIT_MAX_S = 120.0  # at most this much waiting is added back for such stalls


def _wait_for(what: str, check: Callable[[], Any], procs: list[Proc],
              deadline: float, diagnose: Callable[[], str] | None = None) -> Any:
    """``check()`` until it answers something truthy, every 0.25 s, until ``deadline``.

    Time the test process itself did not run (a pass of the loop taking over ``STALL_S``:
    a finaliser run by the garbage collector that retries a stopped server, a starved
    machine) is not the awaited process's silence: the deadline moves by it (up to
    ``STALL_CREDIT_MAX_S``), and a timeout says how many checks were made and the longest
    pass, so a stalled test tells itself apart from a deaf process."""
    tries, longest, credit = 0, 0.0, 0.0
    last = time.monotonic()
    while time.monotonic() < deadline + credit:
        for p in procs:
            if p.popen.poll() is not None:
                pytest.fail(f"{p.name} exited {p.popen.returncode}:\n{p.output()}")
        got = check()
        if got:
            return got
        tries += 1
        time.sleep(0.25)
        now = time.monotonic()
        longest = max(longest, now - last)
        if now - last > STALL_S:
            credit = min(STALL_CREDIT_MAX_S, credit + now - last)
        last = now
    logs = "\n".join(f"--- {p.name}\n{p.output()}" for p in procs)
    seen = diagnose() if diagnose is not None else ""
    pytest.fail(f"timed out waiting for {what} ({tries} checks; the longest pass of the wait "
                f"took {longest:.1f}s; {credit:.1f}s of stalls added to the wait)\n{logs}\n"
                f"{seen}")


def control_diagnosis(redis_url: str, prefix: str, procs: list[Proc]) -> str:
    """What the broker shows of remote control, to tell a deaf worker from a lost reply:
    who listens on pub/sub (a worker's pidbox is a pattern subscription), the reply
    bindings, replies waiting unread; and where each process stands (py-spy, if here)."""
    out = []
    r = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        listeners = [c for c in r.client_list() if int(c.get("psub", 0) or 0)]
        out.append(f"pattern subscribers on the broker: {len(listeners)} "
                   f"(numpat {r.pubsub_numpat()}): "
                   + "; ".join(f"{c['addr']} age {c['age']}s idle {c['idle']}s"
                               for c in listeners))
        for key in r.scan_iter(match=f"{prefix}_kombu.binding.reply.celery.pidbox",
                               count=1000):
            out.append(f"{key!r}: {sorted(r.smembers(key))[:5]!r}")
        for key in r.scan_iter(match=f"{prefix}*.reply.celery.pidbox", count=1000):
            if r.type(key) == b"list":
                out.append(f"unread replies {key!r}: {r.llen(key)}")
    except redis.RedisError as e:
        out.append(f"broker not readable: {e!r}")
    finally:
        r.close()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    for p in procs:
        if Path(spy).exists():
            for pid in live_in_group(p.pgid):
                dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True,
                                      text=True, timeout=30, check=False)
                out.append(f"--- py-spy dump {p.name} pid {pid}\n{dump.stdout}{dump.stderr}")
        out.append(f"--- {p.name}: {thread_stacks(p)}")
    return "\n".join(out)


def thread_stacks(p: Proc, wait_s: float = 10.0) -> str:
    """Every thread's stack in a Celery process, without py-spy: ``celery worker`` dumps
    them to stderr on SIGUSR1 (Celery's "cry" handler), which the signal gets even out of
    a blocking read. What the log gained, once it stops growing; or why there is none."""
    if p.popen.poll() is not None:
        return f"exited with code {p.popen.returncode}"
    before = p.log.stat().st_size
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.popen.pid, signal.SIGUSR1)
    deadline, size, grew_at = time.monotonic() + wait_s, before, 0.0
    while time.monotonic() < deadline:
        now_size = p.log.stat().st_size
        if now_size != size:
            size, grew_at = now_size, time.monotonic()
        elif size > before and time.monotonic() - grew_at > 0.5:
            break
        time.sleep(0.1)
    if size == before:
        return f"no stack dump within {wait_s:.0f} s of SIGUSR1 (its main thread never ran Python)"
    with p.log.open("rb") as f:
        f.seek(before)
        return "stacks on SIGUSR1:\n" + f.read(20_000).decode(errors="replace")


def _readiness_lock(meta: dict[str, Any]) -> dict[str, Any] | None:
    # the status task's result is the payload shaped for Flower (tasks.checks.flower_shape)
    payload = payload_of(meta.get("result") or {})
    locks = payload.get("workflowHealth", {}).get("runLocks", [])
    return next((lk for lk in locks if lk.get("job") == "readiness"), None)


def test_beat_schedule_sends_every_job_to_the_queue_and_the_override_sets_every_period(
) -> None:
    default = build_beat_schedule(Settings(celery_queue="q1", beat_every_s=None))
    assert {e["task"] for e in default.values()} == {
        str(j["task"]) for j in beat_schedule.JOBS.values()}
    assert default["status"]["schedule"].total_seconds() == beat_schedule.JOBS["status"]["every_s"]
    fast = build_beat_schedule(Settings(celery_queue="q1", beat_every_s=2.5))
    for entry in fast.values():
        assert entry["schedule"].total_seconds() == 2.5
        # no Celery ``expires`` (the beat host's clock against the worker's): the period
        # rides along, and the task judges a message's age on Redis's clock
        assert entry["options"] == {"queue": "q1", "headers": {send_window.PERIOD: 2500}}


def test_broker_and_results_use_a_key_prefix_of_the_apps_own() -> None:
    c = Celery("t")
    configure(c, Settings(redis_prefix="dep1:", celery_queue="q1"))
    assert c.conf.broker_transport_options["global_keyprefix"] == "dep1:celery:"
    assert c.conf.result_backend_transport_options["global_keyprefix"] == "dep1:celery:"
    assert c.conf.task_default_queue == "q1"
    assert c.backend.get_key_for_task("abc") == b"dep1:celery:celery-task-meta-abc"
    c.close()


def test_a_wait_does_not_count_a_stall_of_the_test_process_as_the_silence_it_waits_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24: a garbage-collected ``AsyncResult`` whose Redis was stopped retries it from
    ``__del__`` for ~20 s inside whichever test runs then. A ping wait stalled like that had
    asked nothing for that long, yet counted it against the worker."""
    monkeypatch.setattr(sys.modules[__name__], "STALL_S", 0.3)
    calls: list[float] = []

    def check() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.2)  # the stall: past the whole deadline below
        return len(calls) == 3

    assert _wait_for("the third check", check, [], time.monotonic() + 1.0) is True
    assert len(calls) == 3

    # the second part with the normal STALL_S: on a loaded machine, passes over 0.3 s
    # would each earn credit and stretch this wait to its cap
    monkeypatch.undo()
    with pytest.raises(pytest.fail.Exception) as failed:
        _wait_for("nothing", lambda: False, [], time.monotonic() + 0.6)
    assert "timed out waiting for nothing (" in str(failed.value)
    assert "checks; the longest pass of the wait took" in str(failed.value)


def test_flower_refuses_an_open_address_without_basic_auth() -> None:
    assert refuse_open_flower("0.0.0.0", None) is not None
    assert refuse_open_flower("0.0.0.0", "admin:secret") is None
    assert refuse_open_flower("127.0.0.1", None) is None


@pytest.mark.slow
def test_beat_runs_every_job_and_status_lists_the_running_lock_and_a_rerun_is_skipped(
        e2e: dict[str, Any]) -> None:
    r = redis.Redis.from_url(e2e["redis_url"], decode_responses=True)
    prefix = e2e["prefix"]
    node = f"e2e-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    worker = e2e["start"]("worker", "worker", "-E", "--loglevel", "INFO", "--concurrency",
                          "3", "-n", node, "--without-mingle", "--without-gossip")
    deadline = time.monotonic() + DEADLINE_S
    _wait_for("the worker to answer ping",
              lambda: e2e["client"].control.ping(destination=[node], timeout=0.5),
              [worker], deadline,
              lambda: control_diagnosis(e2e["redis_url"], e2e["prefix"], [worker]))
    beat = e2e["start"]("beat", "beat", "--loglevel", "INFO",
                        "--schedule", str(e2e["tmp"] / "celerybeat-schedule"))
    procs = [worker, beat]

    def by_job() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {j: [] for j in JOBS}
        for m in _stored_results(r, prefix):
            job = str(m.get("name", "")).rsplit(".", 1)[-1]
            if job in out:
                out[job].append(m)
        return out

    def status_seeing_readiness() -> dict[str, Any] | None:
        return next((m for m in by_job()["status"]
                     if m["status"] == "SUCCESS" and _readiness_lock(m)), None)

    seen = _wait_for("a stored status result listing the readiness run-lock",
                     status_seeing_readiness, procs, deadline)
    lock = _readiness_lock(seen)
    assert lock is not None
    assert lock["holderAlive"] is True
    assert lock["budgetMs"] > 0 and lock["overBudget"] is False
    assert seen["result"]["workflowHealth"]["runLocksCount"] >= 1
    # the holder is the readiness task that is running: host:pid:<its task id>
    readiness_ids = {m["task_id"] for m in by_job()["readiness"]}
    holder_task_id = lock["holder"].rsplit(":", 1)[-1]
    assert holder_task_id in readiness_ids
    # its result lives under this test's prefix, not under Celery's bare key name
    assert r.exists(f"{prefix}celery-task-meta-{holder_task_id}") == 1
    assert r.exists(f"celery-task-meta-{holder_task_id}") == 0

    # the worker answers the custom inspect command with the held lock
    def inspect_lists_readiness() -> dict[str, Any] | None:
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "app.celery_app", "inspect", "run_locks",
             "--json", "--timeout", "5", "-d", node],
            cwd=REPO, env=e2e["env"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return None
        reply = json.loads(out.stdout.strip().splitlines()[-1])[node]
        jobs = [lk["job"] for lk in reply["runLocks"]]
        return reply if "readiness" in jobs else None

    reply = _wait_for("inspect run_locks to list readiness", inspect_lists_readiness, procs,
                      deadline)
    assert reply["runLocksCount"] == len(reply["runLocks"]) >= 1
    assert set(reply["beat"]) == {"leader", "since", "renewedAt", "ttlMs", "standbys"}
    # ... and the same in the worker's stats (what Flower's worker page shows)
    stats = e2e["client"].control.inspect(destination=[node], timeout=5).stats()[node]
    assert "readiness" in [lk["job"] for lk in stats["runLocks"]]
    assert "elapsed" in stats["run-lock readiness"] and "budget" in stats["run-lock readiness"]
    assert stats["beat"]["leader"] is not None

    # an overlapping readiness run is skipped, naming the running one
    def skipped_readiness() -> dict[str, Any] | None:
        return next((m for m in by_job()["readiness"] if m["status"] == "SUCCESS"
                     and (m["result"] or {}).get("skipped") == "already_running"), None)

    skipped = _wait_for("a readiness run skipped as already_running", skipped_readiness,
                        procs, deadline)["result"]
    assert skipped["ok"] is True and skipped["job"] == "readiness"
    assert skipped["holder"].rsplit(":", 1)[-1] in readiness_ids
    assert skipped["elapsedMs"] >= 0

    # beat fired every job, and each one's run left a successful stored result
    def every_job_succeeded() -> dict[str, list[dict[str, Any]]] | None:
        got = by_job()
        done = {j: [m for m in ms if m["status"] == "SUCCESS"] for j, ms in got.items()}
        return done if all(done.values()) else None

    done = _wait_for("a successful stored result of every job", every_job_succeeded, procs,
                     deadline)
    for job, metas in done.items():
        assert any((m["result"] or {}).get("job") == job for m in metas), job
        assert all(m["queue"] == e2e["env"]["AUTONOMY_CELERY_QUEUE"] for m in metas), job

    # ... and its run record: a later status payload shows every job's last run, ok
    def status_with_every_run_recorded() -> dict[str, Any] | None:
        for m in by_job()["status"]:
            jobs = (payload_of(m["result"] or {}).get("workflowHealth") or {}).get("jobs") or {}
            if all((jobs.get(j) or {}).get("lastRunAt") for j in JOBS):
                return jobs
        return None

    jobs = _wait_for("a status payload with every job's run recorded",
                     status_with_every_run_recorded, procs, deadline)
    assert all(jobs[j]["ok"] is True for j in JOBS), jobs
    # beat stamps each message with Redis's now and its job's period: a message skipped as
    # expired is one that really waited past that period in the queue, on Redis's clock (a
    # loaded machine can keep one there over the 1 s period: issue 24's loaded loop did).
    # Every job's run is recorded above, so they were not all skipped.
    period = timedelta(seconds=float(e2e["env"]["AUTONOMY_BEAT_EVERY_S"]))
    for late in (m["result"] for ms in by_job().values() for m in ms
                 if (m["result"] or {}).get("skipped") == "expired"):
        sent, expired_at, now = (datetime.fromisoformat(late[k])
                                 for k in ("sentAt", "expiredAt", "redisNow"))
        assert expired_at - sent == period and now > expired_at, late
    failed = [m for ms in by_job().values() for m in ms if m["status"] == "FAILURE"]
    assert not failed, [(m["name"], m.get("traceback")) for m in failed]

    print("\ncaptured status payload (stored result of tasks.checks.status):")
    print(json.dumps(seen["result"], indent=2, sort_keys=True, default=str))
    print("inspect run_locks reply:", json.dumps(reply, default=str))
    r.close()


@pytest.mark.slow
def test_a_second_beat_stands_by_and_takes_over_when_the_leader_is_killed(
        e2e: dict[str, Any], redis_server_url: str, redis_prefix: str, sqlite_url: str) -> None:
    """Two real beats: one leads (the beat leader lease, visible in status), the other
    stands by (listed as a standby) and sends nothing until the leader dies; then it takes
    the lease once it lapses and leads. No run-lock is held for the beat."""
    from app.storage import leader, locks
    from app.storage.context import Context

    e2e["env"].update(AUTONOMY_BEAT_LEASE_RENEW_MS="200",
                      AUTONOMY_BEAT_LEASE_TTL_MS="1500",
                      AUTONOMY_BEAT_STANDBY_POLL_S="0.2")
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              beat_lease_ttl_ms=1500, beat_lease_renew_ms=200))
    deadline = time.monotonic() + DEADLINE_S

    def beat_lock() -> dict[str, Any] | None:
        v = leader.view(ctx)
        return v if v["leader"] else None

    try:
        first = e2e["start"]("beat1", "beat", "--loglevel", "INFO",
                             "--schedule", str(e2e["tmp"] / "beat1-schedule"))
        lead = _wait_for("the first beat to lead", beat_lock, [first], deadline)
        assert f":{first.popen.pid}:" in lead["leader"] and lead["ttlMs"] == 1500
        assert all(lk["job"] != "beat" for lk in locks.collect_run_locks(ctx))
        second = e2e["start"]("beat2", "beat", "--loglevel", "INFO",
                              "--schedule", str(e2e["tmp"] / "beat2-schedule"))
        _wait_for("the second beat to stand by",
                  lambda: "stands by" in second.output(), [first, second], deadline)
        _wait_for("the standby to be listed",
                  lambda: any(f":{second.popen.pid}:" in h for h in leader.view(ctx)["standbys"]),
                  [first, second], deadline)
        # the beat probe (compose's healthcheck) passes for the standby, not only the leader
        for beat, role in ((first, "leader"), (second, "standby")):
            probe = subprocess.run(
                [sys.executable, "-m", "app.cli", "probe", "beat", "--json", "--holder-prefix",
                 f"{socket.gethostname()}:{beat.popen.pid}:"],
                cwd=REPO, env=e2e["env"], capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, probe.stdout + probe.stderr
            assert json.loads(probe.stdout)["role"] == role
        _wait_for("the leader to send", lambda: "Sending due task" in first.output(),
                  [first, second], deadline)
        time.sleep(1.5)  # several periods of AUTONOMY_BEAT_EVERY_S=1
        assert "Sending due task" not in second.output()  # a standby sends nothing

        os.killpg(first.pgid, signal.SIGKILL)
        took = _wait_for("the standby to take over",
                         lambda: (lk := beat_lock()) and f":{second.popen.pid}:" in lk["leader"]
                         and lk, [second], deadline)
        assert took["standbys"] == []
        _wait_for("the new leader to send", lambda: "Sending due task" in second.output(),
                  [second], deadline)
        assert "this beat leads" in second.output()
    finally:
        ctx.close()


@pytest.mark.slow
def test_a_message_older_than_its_period_on_redis_clock_is_skipped_and_a_fresh_one_runs(
        e2e: dict[str, Any]) -> None:
    """The age of a job's message is Redis's now minus the send time beat stamped from
    Redis (``app.ops.checks.send_window``): no host's clock decides whether it expired, so
    a beat host whose clock is off cannot have every message dropped (Celery's own
    ``expires`` compared the beat host's clock with the worker's)."""
    r = redis.Redis.from_url(e2e["redis_url"], decode_responses=True)
    node = f"e2e-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    worker = e2e["start"]("worker", "worker", "--loglevel", "INFO", "--concurrency", "1",
                          "-n", node, "--without-mingle", "--without-gossip")
    deadline = time.monotonic() + DEADLINE_S
    _wait_for("the worker to answer ping",
              lambda: e2e["client"].control.ping(destination=[node], timeout=0.5),
              [worker], deadline,
              lambda: control_diagnosis(e2e["redis_url"], e2e["prefix"], [worker]))
    queue = e2e["env"]["AUTONOMY_CELERY_QUEUE"]

    def send(headers: dict[str, int] | None) -> dict[str, Any]:
        sent = e2e["client"].send_task("tasks.checks.readiness", queue=queue, headers=headers)

        def stored() -> dict[str, Any] | None:
            raw = r.get(f"{e2e['prefix']}celery-task-meta-{sent.id}")
            meta = json.loads(raw) if raw else None
            return meta if meta and meta["status"] in ("SUCCESS", "FAILURE") else None

        meta = _wait_for(f"the stored result of {sent.id}", stored, [worker], deadline)
        assert meta["status"] == "SUCCESS", meta
        return dict(meta["result"])

    sec, usec = r.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    # sent 5 s ago (by Redis) with a 1 s period: outlived it, whatever the hosts' clocks say
    old = send({send_window.SENT: now_ms - 5000, send_window.PERIOD: 1000})
    assert old["skipped"] == "expired" and old["job"] == "readiness", old
    assert old["sentAt"] < old["expiredAt"] < old["redisNow"], old
    # sent now with a minute's period: runs
    fresh = send({send_window.SENT: now_ms, send_window.PERIOD: 60_000})
    assert "skipped" not in fresh and fresh["job"] == "readiness", fresh
    # no stamp (a message sent by hand): runs
    by_hand = send(None)
    assert "skipped" not in by_hand and by_hand["job"] == "readiness", by_hand
    assert "skipping readiness: its message expired" in worker.output()
    r.close()
