"""One clock (SPEC 4.9): real worker processes whose wall clocks are 10 minutes off,
beside honest ones, on both backends. The database's clock decides every lease, requeue
and breaker window, so a skewed worker neither takes nor loses a lease early: every task
runs once, no honest lease is requeued, no complete is refused, and a resume gives the
breaker a fresh start whatever the clock of the host that failed before it.

Before migration 0009, with one worker 10 minutes ahead among honest ones, tasks ran
several times (its claims requeued every honest lease as expired, and the honest
completes were refused); one 10 minutes behind granted leases that had already expired,
and lost them to the next honest claim."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.api import metrics
from app.ops import lane_control, lanes
from app.ops.checks import status
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import event_table, lane_table, task_table
from tests.conftest import make_settings
from tests.skew import shifted_env

REPO = Path(__file__).resolve().parent.parent
AHEAD_S, BEHIND_S = 600.0, -600.0
LEASE_TTL_S = 20.0  # far shorter than the skew: a clock 10 minutes off sees every lease expired


@pytest.fixture
def rctx(database_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """The real clock (the test process is an honest host) and a 20 s lease."""
    c = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                            lease_ttl_s=LEASE_TTL_S))
    yield c
    c.close()


def _until(cond: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)


class Fleet:
    """``autonomy worker`` processes on one lane, each with its clock offset."""

    def __init__(self, ctx: Context, tmp: Path, lane: str, command: list[str]) -> None:
        s = ctx.settings
        self.tmp, self.lane, self.command = tmp, lane, command
        self.env = {**os.environ, "DATABASE_URL": s.database_url,
                    "REDIS_URL": s.effective_redis_url,
                    "AUTONOMY_REDIS_PREFIX": s.redis_prefix,
                    "AUTONOMY_LEASE_TTL_S": str(s.lease_ttl_s),
                    "AUTONOMY_CLOCK_SKEW_WARN_S": "5"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, offset_s: float = 0.0, *more: str) -> None:
        """Start worker ``name`` with its wall clock ``offset_s`` seconds off."""
        env = shifted_env(self.env, offset_s, self.tmp / f"clock-{name}")
        with (self.tmp / f"{name}.log").open("wb") as err:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--lane", self.lane, "--name", name,
                 *more, "--", *self.command], env=env, cwd=REPO,
                stdout=subprocess.DEVNULL, stderr=err)

    def log(self, name: str) -> str:
        """What worker ``name`` logged so far."""
        return (self.tmp / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def wait_running(self) -> None:
        """Until every worker started has said it runs."""
        for name in self.procs:
            _until(lambda n=name: "running " in self.log(n), f"worker {name} started", 60)

    def stop(self) -> None:
        """SIGTERM every worker still running and wait for it (SIGKILL past 30 s)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@contextmanager
def fleet(ctx: Context, tmp: Path, lane: str, command: list[str]) -> Iterator[Fleet]:
    """A ``Fleet`` whose every process is stopped when the block ends."""
    f = Fleet(ctx, tmp, lane, command)
    try:
        yield f
    finally:
        f.stop()


def _statuses(ctx: Context, lane: str) -> Counter[str]:
    with transaction(ctx.engine, write=False) as conn:
        return Counter(conn.execute(sa.select(task_table.c.status)
                                    .where(task_table.c.assignee == lane)).scalars().all())


def _events(ctx: Context, lane: str) -> Counter[str]:
    with transaction(ctx.engine, write=False) as conn:
        return Counter(conn.execute(sa.select(event_table.c.kind)
                                    .where(event_table.c.assignee == lane)).scalars().all())


@pytest.mark.slow
def test_workers_ten_minutes_ahead_and_behind_run_every_task_once(
        rctx: Context, tmp_path: Path) -> None:
    """Two honest workers, one 10 minutes ahead, one 10 minutes behind, on a lane of
    four slots: every task runs exactly once, no lease is requeued, no complete refused."""
    lane, n = "skew", 40
    runs = tmp_path / "runs"
    lane_control.configure_lane(rctx, assignee=lane, max_in_flight=4)
    cmd = ["sh", "-c", f'echo "$AUTONOMY_TASK_ID $AUTONOMY_WORKER" >> {runs}; sleep 0.3']
    with fleet(rctx, tmp_path, lane, cmd) as f:
        f.start("honest-1")
        f.start("honest-2")
        f.start("ahead", AHEAD_S)
        f.start("behind", BEHIND_S)
        f.wait_running()
        ids = [lanes.create(rctx, assignee=lane, title=f"t{i}")["task"]["id"]
               for i in range(n)]
        _until(lambda: _statuses(rctx, lane)["done"] == n, f"all {n} tasks done")
    ran = Counter(int(line.split()[0]) for line in runs.read_text().splitlines())
    workers = Counter(line.split()[1] for line in runs.read_text().splitlines())
    events = _events(rctx, lane)
    assert {t: c for t, c in ran.items() if c != 1} == {}, (workers, events)
    assert sorted(ran) == sorted(ids)
    assert events["lease_requeued"] == 0, events
    assert events["complete_refused"] == 0, events
    assert events["task_completed"] == n, events
    assert set(workers) == {"honest-1", "honest-2", "ahead", "behind"}, workers
    # each worker's skew is reported (status, /metrics) and the skewed ones warned
    skew = status.build_status(rctx)["clockSkew"]
    by = {w["worker"]: w for w in skew["workers"]}
    assert set(by) == {"honest-1", "honest-2", "ahead", "behind"}, skew
    assert abs(by["ahead"]["skewMs"] - AHEAD_S * 1000) < 5_000, skew
    assert abs(by["behind"]["skewMs"] - BEHIND_S * 1000) < 5_000, skew
    assert abs(by["honest-1"]["skewMs"]) < 5_000 and not by["honest-1"]["skewed"], skew
    assert (skew["skewed"], skew["reporting"]) == (2, 4), skew
    scraped = metrics.render(status.build_status(rctx)).decode()
    assert "autonomy_workers_clock_skewed 2.0" in scraped
    worst = re.search(r"^autonomy_worker_clock_skew_max_seconds (\S+)$", scraped, re.M)
    assert worst is not None and abs(float(worst.group(1)) - AHEAD_S) < 5, scraped
    for name, way in (("ahead", "ahead of"), ("behind", "behind")):
        assert f"s {way} the database's" in f.log(name), f.log(name)
    assert "the database's (more than" not in f.log("honest-1")


@pytest.mark.slow
def test_a_resume_gives_the_breaker_a_fresh_start_after_a_skewed_host_tripped_it(
        rctx: Context, tmp_path: Path) -> None:
    """A host 10 minutes ahead fails three tasks and trips the breaker; an operator
    resumes the lane; the next honest failure of the same fingerprint counts 1 (the
    window starts at the resume, on the database's clock) and does not pause the lane."""
    lane = "brk"
    for i in range(5):
        lanes.create(rctx, assignee=lane, title=f"t{i}")
    cmd = ["sh", "-c", "echo 'the build broke' >&2; exit 1"]
    with fleet(rctx, tmp_path, lane, cmd) as f:
        f.start("ahead", AHEAD_S, "--max-tasks", "3")
        _until(lambda: f.procs["ahead"].poll() is not None, "the skewed worker's 3 failures")
    with transaction(rctx.engine, write=False) as conn:
        tripped = store.get_lane(conn, assignee=lane)
    assert tripped is not None and tripped["paused"], "three failures trip the breaker"
    lane_control.resume_lane(rctx, assignee=lane, actor="operator")
    with fleet(rctx, tmp_path, lane, cmd) as f:
        f.start("honest", 0.0, "--max-tasks", "1")
        _until(lambda: f.procs["honest"].poll() is not None, "the honest failure")
    with transaction(rctx.engine, write=False) as conn:
        after = conn.execute(sa.select(lane_table).where(lane_table.c.assignee == lane)
                             ).mappings().one()
        fps = conn.execute(sa.select(event_table.c.data).where(
            event_table.c.assignee == lane, event_table.c.kind == "fingerprint_recorded")
            .order_by(event_table.c.id)).scalars().all()
    assert len(fps) == 4, fps
    assert fps[-1]["count"] == 1, fps
    assert not after["paused"], (after["paused_reason"], fps)
    assert _events(rctx, lane)["lane_paused"] == 1
