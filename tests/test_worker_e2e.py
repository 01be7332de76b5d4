"""``autonomy worker`` end to end: real worker processes, real commands, real Redis and a
real database, killed and signalled for real. Each test prints its counts (``-s``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app import ops
from app.errors import StaleLease
from app.local import demo
from app.ops import lane_control, lanes
from app.ops.checks import jobs
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import event_table, ffl_table, task_table
from tests.conftest import make_settings
from tests.test_race import ENDS, GRANT, lane_peaks, lease_overlaps

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


class Fleet:
    """Worker processes sharing the test's database and Redis prefix; all killed at the end."""

    def __init__(self, ctx: Context, tmp: Path, **env: str) -> None:
        self.ctx, self.tmp = ctx, tmp
        s = ctx.settings
        self.env = {**os.environ, "DATABASE_URL": s.database_url,
                    "REDIS_URL": s.effective_redis_url, "AUTONOMY_REDIS_PREFIX": s.redis_prefix,
                    "AUTONOMY_LEASE_TTL_S": str(s.lease_ttl_s), **env}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, lane: str, cmd: list[str], *opts: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, [sys.executable, "-m", "app.cli", "worker", "--lane", lane,
                                 "--name", name, "--json", "--idle-max", "0.2",
                                 "--pause-max", "0.5", *opts, "--", *cmd])

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = (self.tmp / f"{name}.out").open("wb")
        err = (self.tmp / f"{name}.err").open("wb")
        p = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=out, stderr=err)
        out.close()
        err.close()
        self.procs[name] = p
        return p

    def stderr(self, name: str) -> str:
        return (self.tmp / f"{name}.err").read_text()

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        p = self.procs[name]
        p.send_signal(sig)
        return p.wait(timeout_s)

    def summary(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.tmp / f"{name}.out").read_text().strip().splitlines()[-1]))

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def fleet_ctx(database_url: str, redis_server_url: str, redis_prefix: str
              ) -> Iterator[Context]:
    c = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                            lease_ttl_s=2.0))
    yield c
    c.close()


@pytest.fixture
def sqlite_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            lease_ttl_s=2.0))
    yield c
    c.close()


@pytest.fixture
def fleet(sqlite_ctx: Context, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(sqlite_ctx, tmp_path)
    yield f
    f.kill_all()


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def _scalar(ctx: Context, q: Any) -> Any:
    with transaction(ctx.engine, write=False) as conn:
        return conn.execute(q).scalar()


def _rows(ctx: Context, q: Any) -> list[Any]:
    with transaction(ctx.engine, write=False) as conn:
        return list(conn.execute(q).all())


def _task(ctx: Context, tid: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
    assert row is not None
    return dict(row)


def _status_count(ctx: Context, status: str, lane: str | None = None) -> int:
    q = sa.select(sa.func.count()).select_from(task_table).where(task_table.c.status == status)
    if lane is not None:
        q = q.where(task_table.c.assignee == lane)
    return int(_scalar(ctx, q))


def _lane_paused(ctx: Context, lane: str) -> bool:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_lane(conn, assignee=lane)
    return bool(row and row["paused"])


def _self_heal(ctx: Context) -> list[int]:
    """The real self-heal job, under its run-lock; answers the task ids it requeued."""
    summary = jobs.run_job(ctx, "self_heal")
    assert summary["ok"] is True and "skipped" not in summary
    return list(summary["requeued"])


# --- 300 tasks, 3 processes, 2 lanes ------------------------------------------------------


def test_three_worker_processes_drain_300_tasks_on_two_lanes_each_exactly_once(
        fleet_ctx: Context, tmp_path: Path, backend: str) -> None:
    ctx = fleet_ctx
    for lane, n in (("alpha", 150), ("beta", 150)):
        for i in range(n):
            lanes.create(ctx, assignee=lane, title=f"{lane} {i}", payload={"i": i})
    lane_control.configure_lane(ctx, assignee="alpha", max_in_flight=3, actor="test")
    lane_control.configure_lane(ctx, assignee="beta", max_in_flight=2, actor="test")
    runlog = tmp_path / "runs.log"
    cmd = ["sh", "-c", 'cat > /dev/null; echo "$AUTONOMY_TASK_ID $AUTONOMY_WORKER" >> '
           f'{runlog}; echo "{{\\"ran\\": $AUTONOMY_TASK_ID}}"']
    fleet = Fleet(ctx, tmp_path)
    try:
        started = time.monotonic()
        fleet.start("w1", "alpha", cmd)
        fleet.start("w2", "alpha", cmd, "--concurrency", "2")
        fleet.start("w3", "beta", cmd, "--concurrency", "2")
        took = _until(lambda: _status_count(ctx, "done") == 300, 150, "300 tasks done")
        codes = {n: fleet.stop(n) for n in ("w1", "w2", "w3")}
        assert codes == {"w1": 0, "w2": 0, "w3": 0}
        elapsed = time.monotonic() - started
    finally:
        fleet.kill_all()
    summaries = {n: fleet.summary(n) for n in ("w1", "w2", "w3")}
    assert sum(s["succeeded"] for s in summaries.values()) == 300
    assert all(s["failed"] == s["released"] == s["lost"] == 0 for s in summaries.values())
    assert _status_count(ctx, "done") == 300
    e = event_table
    completed = Counter(r[0] for r in _rows(ctx, sa.select(e.c.task_id)
                                            .where(e.c.kind == "task_completed")))
    assert len(completed) == 300 and set(completed.values()) == {1}
    runs = Counter(line.split()[0] for line in runlog.read_text().splitlines())
    assert len(runs) == 300 and set(runs.values()) == {1}
    results = _rows(ctx, sa.select(task_table.c.id, task_table.c.result))
    assert all(res == {"ran": tid} for tid, res in results)
    per_worker = Counter(line.split()[1] for line in runlog.read_text().splitlines())
    print(f"\n[e2e drain/{backend}] 300 tasks done in {took:.1f}s ({elapsed:.1f}s with "
          f"start/stop); task_completed events: {sum(completed.values())} over "
          f"{len(completed)} tasks; command runs: {sum(runs.values())}; per worker: "
          f"{dict(sorted(per_worker.items()))}; summaries: "
          f"{ {n: s['succeeded'] for n, s in summaries.items()} }")


@pytest.mark.slow
def test_auto_prefetching_worker_processes_share_a_lane_within_its_room_each_task_once(
        database_url: str, redis_server_url: str, redis_prefix: str, tmp_path: Path) -> None:
    """Three ``autonomy worker --prefetch auto`` processes (four claiming loops) racing in a
    lane of 12: short commands grow each loop's K past 1, every lease still counts, so the
    lane never holds more than 12 live leases (the grant and end events walked in commit
    order), no task is leased twice at once, and each of the 200 runs exactly once."""
    # leases of 30 s: a lease waiting its turn is never left to a late heartbeat here
    ctx = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                              lease_ttl_s=30.0))
    try:
        _auto_fleet(ctx, tmp_path)
    finally:
        ctx.close()


def _auto_fleet(ctx: Context, tmp_path: Path) -> None:
    n, room = 200, 12
    ids = [lanes.create(ctx, assignee="alpha", title=f"t{i}")["task"]["id"] for i in range(n)]
    lane_control.configure_lane(ctx, assignee="alpha", max_in_flight=room, actor="test")
    runlog = tmp_path / "runs.log"
    cmd = ["sh", "-c", f'cat > /dev/null; echo "$AUTONOMY_TASK_ID" >> {runlog}']
    # a command's fork and exec take ms here, 100s of ms on a loaded machine: a wait of
    # 5 s lets K reach its cap either way
    fleet = Fleet(ctx, tmp_path, AUTONOMY_WORKER_PREFETCH_AUTO_WAIT_MS="5000")
    try:
        fleet.start("w1", "alpha", cmd, "--prefetch", "auto")
        fleet.start("w2", "alpha", cmd, "--prefetch", "auto")
        fleet.start("w3", "alpha", cmd, "--prefetch", "auto", "--concurrency", "2")
        _until(lambda: _status_count(ctx, "done") == n, 240, f"{n} tasks done")
        codes = {w: fleet.stop(w) for w in ("w1", "w2", "w3")}
    finally:
        fleet.kill_all()
    assert codes == {"w1": 0, "w2": 0, "w3": 0}, {w: fleet.stderr(w)[-2000:] for w in codes}
    summaries = {w: fleet.summary(w) for w in codes}
    assert sum(s["succeeded"] for s in summaries.values()) == n, summaries
    assert all(s["failed"] == s["lost"] == 0 for s in summaries.values()), summaries
    runs = Counter(int(line) for line in runlog.read_text().split())
    assert sorted(runs) == ids and set(runs.values()) == {1}
    e = event_table
    events = _rows(ctx, sa.select(e.c.id, e.c.kind, e.c.assignee, e.c.task_id, e.c.actor)
                   .where(e.c.kind.in_((GRANT, *ENDS))).order_by(e.c.id))
    events = [dict(r._mapping) for r in events]
    overlaps, after_done = lease_overlaps(events)
    assert overlaps == [] and after_done == []
    assert lane_peaks(events)["alpha"] <= room
    assert Counter(r["task_id"] for r in events if r["kind"] == "task_completed") \
        == Counter(ids)
    # the loops batched: a complete_many's events share its transaction's time, and a
    # loop's one-at-a-time completes never do
    at = _rows(ctx, sa.select(e.c.actor, e.c.at).where(e.c.kind == "task_completed"))
    assert max(Counter((r[0], r[1]) for r in at).values()) > 1, "no loop completed a batch"


# --- SIGKILL mid-task -----------------------------------------------------------------------


def test_a_killed_workers_task_is_requeued_by_self_heal_and_finished_by_another(
        fleet: Fleet, sqlite_ctx: Context, tmp_path: Path) -> None:
    ctx = sqlite_ctx
    tid = lanes.create(ctx, assignee="kill", title="survive a crash")["task"]["id"]
    first, pidfile, go = tmp_path / "first", tmp_path / "cmd.pid", tmp_path / "go"
    # the first run hangs (until its worker is killed); a later run waits for the test's
    # go-ahead (so the replays below land while it holds the task) and succeeds
    cmd = ["sh", "-c", f'cat > /dev/null; if mkdir {first} 2>/dev/null; then echo $$ > '
           f'{pidfile}; exec sleep 30; fi; while [ ! -e {go} ]; do sleep 0.05; done; '
           'echo "{\\"by\\": \\"$AUTONOMY_WORKER\\"}"']
    fleet.start("victim", "kill", cmd)
    _until(pidfile.exists, 30, "the victim's command to start")
    victim_token = _task(ctx, tid)["lease_token"]
    assert _task(ctx, tid)["claimed_by"] == "victim"
    fleet.procs["victim"].kill()  # SIGKILL: no release, no complete
    fleet.procs["victim"].wait(10)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)  # its orphaned command, for tidiness
    assert _task(ctx, tid)["status"] == "in_progress"

    _until(lambda: _task(ctx, tid)["lease_expires_at"] <= ctx.clock(), 10, "lease expiry")
    assert _self_heal(ctx) == [tid]
    row = _task(ctx, tid)
    assert row["status"] == "todo" and row["lease_token"] is None

    fleet.start("rescuer", "kill", cmd)
    _until(lambda: _task(ctx, tid)["claimed_by"] == "rescuer", 30, "the rescuer's claim")
    # the dead worker's token, replayed while the rescuer holds the task: refused, nothing written
    for action in ("heartbeat", "complete"):
        with pytest.raises(StaleLease):
            ops.dispatch(ctx, {"action": action, "taskId": tid, "leaseToken": victim_token,
                               "outcome": "success"})
    replay = subprocess.run([sys.executable, "-m", "app.cli", "complete", str(tid),
                             victim_token, "--json"], env=fleet.env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert replay.returncode == 1 and json.loads(replay.stdout)["error"] == "stale_lease"
    assert _task(ctx, tid)["status"] == "in_progress"
    assert _task(ctx, tid)["claimed_by"] == "rescuer"

    go.touch()
    _until(lambda: _task(ctx, tid)["status"] == "done", 30, "the rescuer to finish")
    assert fleet.stop("rescuer") == 0
    assert _task(ctx, tid)["result"] == {"by": "rescuer"}
    with transaction(ctx.engine, write=False) as conn:
        kinds = [r["kind"] for r in store.list_events(conn, task_id=tid)][::-1]
        refused = [r["reason"] for r in store.list_events(conn, task_id=tid)
                   if r["kind"].endswith("_refused")]
    assert kinds.count("lease_granted") == 2 and kinds.count("task_completed") == 1
    assert sorted(refused) == ["stale_lease"] * 3
    print(f"\n[e2e sigkill] events for task {tid}: {kinds}; refused replays: {refused}")


# --- the breaker ---------------------------------------------------------------------------


def test_a_command_that_always_fails_trips_the_breaker_after_exactly_3_failures(
        fleet: Fleet, sqlite_ctx: Context) -> None:
    ctx = sqlite_ctx
    for i in range(6):
        lanes.create(ctx, assignee="flaky", title=f"flaky {i}")
    reason = "lint failed: missing docstring"
    cmd = ["sh", "-c", f"cat > /dev/null; echo 'linting...' >&2; echo '{reason}' >&2; exit 1"]
    fleet.start("f1", "flaky", cmd)
    fleet.start("f2", "flaky", cmd)
    fp = f"flaky:{reason}"
    f = ffl_table
    count = sa.select(sa.func.count()).select_from(f).where(f.c.fingerprint == fp)

    _until(lambda: _lane_paused(ctx, "flaky"), 60, "the breaker to pause the lane")
    _until(lambda: all("lane_paused" in fleet.stderr(n) for n in ("f1", "f2")), 30,
           "both workers to report the pause")
    time.sleep(1.5)  # several backoff periods: they keep asking, and are refused
    assert _scalar(ctx, count) == 3
    e = event_table
    paused_at = _scalar(ctx, sa.select(e.c.id).where(e.c.kind == "lane_paused"))
    grants_after = sa.select(sa.func.count()).select_from(e).where(
        e.c.kind == "lease_granted", e.c.assignee == "flaky", e.c.id > paused_at)
    assert _scalar(ctx, grants_after) == 0
    assert _status_count(ctx, "in_progress", "flaky") == 0
    remediation = _rows(ctx, sa.select(task_table.c.assignee, task_table.c.kind)
                        .where(task_table.c.failure_fingerprint == fp,
                               task_table.c.kind == "ops_remediation"))
    assert remediation == [("ops", "ops_remediation")]
    counts = [r[0]["count"] for r in _rows(ctx, sa.select(e.c.data).where(
        e.c.kind == "fingerprint_recorded").order_by(e.c.id))]
    assert counts == [1, 2, 3]

    lane_control.resume_lane(ctx, assignee="flaky", actor="test")
    resumed_at = _scalar(ctx, sa.select(sa.func.max(e.c.id)).where(e.c.kind == "lane_resumed"))
    _until(lambda: _scalar(ctx, count) > 3 and _lane_paused(ctx, "flaky"), 60,
           "the workers to go on after the resume, and trip again")
    time.sleep(1.0)
    assert _scalar(ctx, count) == 6  # a fresh window: exactly 3 more, then paused again
    grants_since = sa.select(sa.func.count()).select_from(e).where(
        e.c.kind == "lease_granted", e.c.assignee == "flaky", e.c.id > resumed_at)
    assert _scalar(ctx, grants_since) == 3
    assert fleet.stop("f1") == 0 and fleet.stop("f2") == 0
    stats = [fleet.summary(n) for n in ("f1", "f2")]
    assert sum(s["failed"] for s in stats) == 6
    counts = [r[0]["count"] for r in _rows(ctx, sa.select(e.c.data).where(
        e.c.kind == "fingerprint_recorded").order_by(e.c.id))]
    print(f"\n[e2e breaker] fingerprint counts per failure: {counts}; failures per worker: "
          f"{[s['failed'] for s in stats]}; remediation tasks: {len(remediation)}")


# --- SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_mid_task_completes_it_within_the_grace_or_releases_its_lease(
        fleet: Fleet, sqlite_ctx: Context, tmp_path: Path) -> None:
    ctx = sqlite_ctx
    fin = [lanes.create(ctx, assignee="finish", title=f"f{i}")["task"]["id"] for i in range(2)]
    ab = [lanes.create(ctx, assignee="abandon", title=f"a{i}")["task"]["id"] for i in range(2)]
    s1, s2, pid2 = tmp_path / "s1", tmp_path / "s2", tmp_path / "pid2"
    go = tmp_path / "go"
    fleet.start("quick", "finish", ["sh", "-c", f"cat >/dev/null; touch {s1}; while [ ! -e {go} ];"
                                                " do sleep 0.05; done; echo finished"],
                "--grace", "20")
    fleet.start("slow", "abandon", ["sh", "-c", f"cat >/dev/null; echo $$ > {pid2}; touch {s2};"
                                                " exec sleep 60"], "--grace", "0.5")
    _until(lambda: s1.exists() and s2.exists(), 30, "both commands to start")
    fleet.procs["quick"].send_signal(signal.SIGTERM)
    _until(lambda: "SIGTERM" in fleet.stderr("quick"), 10, "the quick worker to take the signal")
    go.touch()  # its command finishes inside the grace period; the worker then exits by itself
    # (no second signal: a second one would cut the grace short and release the task)
    assert fleet.procs["quick"].wait(20) == 0
    assert fleet.stop("slow") == 0
    assert _task(ctx, fin[0])["status"] == "done"
    assert _task(ctx, fin[0])["result"] == {"stdout": "finished\n"}
    row = _task(ctx, ab[0])
    assert row["status"] == "todo" and row["lease_token"] is None and row["attempts"] == 0
    assert _status_count(ctx, "in_progress") == 0
    # stopped claiming: the second task of each lane was never leased
    for tid in (fin[1], ab[1]):
        assert _task(ctx, tid)["status"] == "todo" and _task(ctx, tid)["claimed_by"] is None
    with transaction(ctx.engine, write=False) as conn:
        released = [r["kind"] for r in store.list_events(conn, task_id=ab[0])]
    assert "lease_released" in released
    cmd_pid = int(pid2.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(cmd_pid, 0)
    print(f"\n[e2e sigterm] quick: {fleet.summary('quick')}; slow: {fleet.summary('slow')}")


# --- the demo --------------------------------------------------------------------------------


def test_the_demo_trips_the_breaker_within_its_first_minute_and_stops_cleanly(
        fleet: Fleet, sqlite_ctx: Context) -> None:
    ctx = sqlite_ctx
    seeded = demo.seed(ctx)
    started = time.monotonic()
    for i, argv in enumerate(demo.worker_commands(ctx.settings)):
        fleet.spawn(f"demo{i}", argv)
    tripped = _until(lambda: _lane_paused(ctx, demo.FAILING_LANE), 60,
                     "the demo's breaker to trip")
    _until(lambda: _status_count(ctx, "done", demo.HEALTHY_LANE) >= 1, 30,
           "the healthy demo worker to finish a task")
    fp = f"{demo.FAILING_LANE}:{demo.FAILURE_REASON}"
    assert _rows(ctx, sa.select(task_table.c.kind).where(
        task_table.c.failure_fingerprint == fp, task_table.c.assignee == "ops")) \
        == [("ops_remediation",)]
    done = _status_count(ctx, "done", demo.HEALTHY_LANE)
    codes = [fleet.stop(n, timeout_s=30) for n in list(fleet.procs)]
    assert codes == [0] * len(codes)
    assert _status_count(ctx, "in_progress") == 0
    print(f"\n[e2e demo] seeded {seeded['created']}; breaker tripped {tripped:.1f}s after "
          f"start; coder tasks done by then: {done}; stopped in "
          f"{time.monotonic() - started - tripped:.1f}s more; exit codes {codes}")


def test_the_demo_deployer_task_goes_dead_with_its_last_reason_and_is_requeued_by_the_cli(
        fleet: Fleet, sqlite_ctx: Context) -> None:
    """The demo's third lane (issue 21): its one task fails with a different reason each
    attempt, so the breaker never trips, and ends ``dead`` at the lane's ``max_attempts``
    -- as ``autonomy tasks --status dead`` shows -- and ``autonomy requeue`` sends it
    round again."""
    ctx = sqlite_ctx
    seeded = demo.seed(ctx)
    assert seeded["created"][demo.DEAD_LANE] == 1
    argv = next(a for a in demo.worker_commands(ctx.settings) if demo.DEAD_LANE in a)
    started = time.monotonic()
    fleet.spawn("deployer", argv)
    dead_after = _until(lambda: _status_count(ctx, "dead", demo.DEAD_LANE) == 1, 60,
                        "the demo's deployer task to go dead")
    assert fleet.stop("deployer", timeout_s=30) == 0

    def cli(*args: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "app.cli", *args], env=fleet.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    listed = cli("tasks", "--lane", demo.DEAD_LANE, "--status", "dead")["tasks"]
    assert len(listed) == 1
    task = listed[0]
    assert task["title"] == demo.DEAD_TASK
    assert task["attempts"] == demo.DEAD_MAX_ATTEMPTS
    assert task["lastValidationReason"] == demo.DEAD_REASONS[demo.DEAD_MAX_ATTEMPTS - 1]
    assert not _lane_paused(ctx, demo.DEAD_LANE)  # three reasons, three fingerprints
    with transaction(ctx.engine, write=False) as conn:
        kinds = [e["kind"] for e in store.list_events(conn, task_id=task["id"])]
    assert kinds.count("lease_granted") == demo.DEAD_MAX_ATTEMPTS
    back = cli("requeue", str(task["id"]))["task"]
    assert back["status"] == "todo" and back["attempts"] == 0
    print(f"\n[e2e demo dead] task {task['id']} dead {dead_after:.1f}s after its worker "
          f"started ({time.monotonic() - started:.1f}s with the CLI), last reason "
          f"{task['lastValidationReason']!r}; requeued: {back['status']}")
