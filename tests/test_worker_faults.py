"""A worker through faults (SPEC 4.7): it keeps an outcome it could not report and never
runs that task again; its command never outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import DatabaseUnavailable
from app.ops import lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.workers.client import Client, LocalClient
from app.workers.lane_worker import LaneWorker
from tests.conftest import make_settings

# faults injected into a real worker (its database or Redis taken away mid-task)
pytestmark = pytest.mark.fault

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def rctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """SQLite, the real clock and a 1 s lease."""
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            lease_ttl_s=1.0))
    yield c
    c.close()


def _until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class OutageClient(Client):
    """The real in-process client, with a database outage switched on and off: while
    ``down`` is set, every action answers ``database_unavailable`` as the API does."""

    def __init__(self, ctx: Context) -> None:
        self.inner = LocalClient(ctx)
        self.settings = self.inner.settings
        self.down = threading.Event()
        self.refused: list[str] = []

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.down.is_set():
            self.refused.append(str(request.get("action")))
            raise DatabaseUnavailable("the database cannot be reached (outage)")
        return self.inner.call(request)

    def close(self) -> None:
        self.inner.close()


def _task(ctx: Context, tid: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
    assert row is not None
    return dict(row)


def test_an_outcome_not_reported_before_the_lease_ran_out_is_kept_and_never_rerun(
        rctx: Context) -> None:
    """The outage outlasts the lease: the worker retries (heartbeating) until the lease runs
    out, keeps the outcome, and when its claim brings the task back it reports that
    outcome instead of running the handler again. Before: it gave up and re-ran it."""
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    client = OutageClient(rctx)
    runs: list[int] = []
    lines: list[str] = []

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        runs.append(task["id"])
        client.down.set()  # the database goes away while the command runs
        return {"n": len(runs)}

    w = LaneWorker("coder", handler, worker_name="w1", client=client, say=lines.append,
                   idle_backoff_s=(0.01, 0.05), pause_backoff_s=(0.05, 0.1))
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    _until(lambda: any("outcome kept (success)" in ln for ln in lines))
    assert "complete" in client.refused and "heartbeat" in client.refused
    client.down.clear()  # it comes back; the next claim gets the task again
    _until(lambda: _task(rctx, tid)["status"] == "done")
    stop.set()
    t.join(10)
    assert runs == [tid]
    assert _task(rctx, tid)["result"] == {"n": 1}
    assert any("reporting the outcome it already has" in ln for ln in lines), lines


def test_an_outage_shorter_than_the_lease_is_retried_through_to_done(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    client = OutageClient(rctx)
    lines: list[str] = []

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        client.down.set()
        threading.Timer(0.3, client.down.clear).start()
        return {"ok": 1}

    w = LaneWorker("coder", handler, worker_name="w1", client=client, say=lines.append)
    job = w.claim_one(threading.Event())
    assert job is not None
    w.work(job)
    assert _task(rctx, tid)["status"] == "done" and w.stats.succeeded == 1
    assert not any("kept" in ln for ln in lines), lines


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.slow
def test_a_sigkilled_workers_command_and_its_children_die_with_it(
        rctx: Context, tmp_path: Path) -> None:
    """Before: the command ran in its own session and outlived the worker (and the task
    then ran twice)."""
    lanes.create(rctx, assignee="coder", title="t")
    pids = tmp_path / "pids"
    cmd = ["sh", "-c", f"cat >/dev/null; sleep 300 & echo $! $$ > {pids}.tmp; "
           f"mv {pids}.tmp {pids}; wait"]
    s = rctx.settings
    env = {**os.environ, "DATABASE_URL": s.database_url, "REDIS_URL": s.effective_redis_url,
           "AUTONOMY_REDIS_PREFIX": s.redis_prefix, "AUTONOMY_LEASE_TTL_S": "30"}
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--lane", "coder",
                               "--name", "w1", "--", *cmd], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until(pids.exists, 60)
        child, command = (int(x) for x in pids.read_text().split())
        assert _alive(child) and _alive(command)
        worker.kill()
        worker.wait(10)
        _until(lambda: not _alive(command) and not _alive(child), 10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        if pids.exists():
            for pid in (int(x) for x in pids.read_text().split()):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _watchdog_of(worker_pid: int) -> int | None:
    """The command watchdog the worker started (a child running ``python -I -S -c``)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(") ", 1)[1].split()[1]) == worker_pid and b"-S" in argv \
                and b"-c" in argv:
            return int(entry)
    return None


def _group_alive(pgid: int) -> bool:
    """Any process of group ``pgid`` that is not a zombie."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.mark.slow
def test_a_sigkilled_workers_command_dies_by_its_parent_death_signal_without_the_watchdog(
        rctx: Context, tmp_path: Path) -> None:
    """The watchdog is killed first, so only the parent-death signal is left to end the
    command when the worker is SIGKILLed: the launcher (``setpriv --pdeathsig``) that
    keeps ``subprocess`` on its vfork path must have set it. The command's group is gone."""
    lanes.create(rctx, assignee="coder", title="t")
    pidfile = tmp_path / "pid"
    cmd = ["sh", "-c", f"cat >/dev/null; echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
           "exec sleep 300"]
    s = rctx.settings
    env = {**os.environ, "DATABASE_URL": s.database_url, "REDIS_URL": s.effective_redis_url,
           "AUTONOMY_REDIS_PREFIX": s.redis_prefix, "AUTONOMY_LEASE_TTL_S": "30"}
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--lane", "coder",
                               "--name", "w1", "--", *cmd], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command = 0
    try:
        _until(pidfile.exists, 60)
        command = int(pidfile.read_text())
        assert os.getpgid(command) == command  # a group of its own
        watchdog = _watchdog_of(worker.pid)
        assert watchdog is not None
        os.kill(watchdog, signal.SIGKILL)
        _until(lambda: not _alive(watchdog), 10)
        assert _alive(command)
        worker.kill()
        worker.wait(10)
        _until(lambda: not _group_alive(command), 10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        if command and _group_alive(command):
            os.killpg(command, signal.SIGKILL)
