"""``autonomy worker`` and a cancelled task (SPEC 4.11): the heartbeat answers
``task_cancelled``, the worker stops the running command -- its whole process group,
SIGTERM then SIGKILL after the grace -- logs "cancelled", reports no outcome, and goes on
to the next task. Real clock, real processes, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.ops import lanes, lifecycle
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.workers.client import LocalClient
from app.workers.command import CommandRunner
from app.workers.lane_worker import LaneWorker
from tests.conftest import make_settings
from tests.test_worker import _alive, _in_thread, _until


@pytest.fixture
def wctx(database_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    c = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                            lease_ttl_s=5.0))
    yield c
    c.close()


def _status(ctx: Context, tid: int) -> str:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
    assert row is not None
    return str(row["status"])


@pytest.mark.slow
@pytest.mark.parametrize("ignores_term", [False, True])
def test_a_cancelled_tasks_command_is_stopped_and_the_worker_goes_on(
        wctx: Context, tmp_path: Path, ignores_term: bool) -> None:
    tid = lanes.create(wctx, assignee="coder", title="long")["task"]["id"]
    nxt = lanes.create(wctx, assignee="coder", title="next")["task"]["id"]
    child, leader, started = tmp_path / "child", tmp_path / "leader", tmp_path / "started"
    trap = "trap '' TERM; " if ignores_term else ""
    # the first task runs a command with a child of its own; the next one ends at once
    script = (f'if [ ! -e {started} ]; then {trap}echo $$ > {leader}; '
              f'sleep 60 & echo $! > {child}; touch {started}; wait; fi')
    lines: list[str] = []
    w = LaneWorker("coder", CommandRunner(["sh", "-c", script], grace_s=0.5, kill_wait_s=0.5),
                   worker_name="w1", client=LocalClient(wctx), say=lines.append,
                   idle_backoff_s=(0.01, 0.05), heartbeat_interval_s=0.05)
    stop = threading.Event()
    t = _in_thread(lambda: w.run(stop_event=stop))
    try:
        _until(lambda: started.exists() and child.exists() and child.read_text().strip() != "")
        pids = int(leader.read_text()), int(child.read_text())
        assert lifecycle.cancel(wctx, task_id=tid, actor="alice")["task"]["status"] \
            == "cancelled"
        _until(lambda: not any(_alive(p) for p in pids), 10)
        _until(lambda: _status(wctx, nxt) == "done", 10)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert _status(wctx, tid) == "cancelled"  # no outcome was reported over the cancel
    assert w.stats.cancelled == 1 and w.stats.succeeded == 1 and w.stats.failed == 0
    assert any(f"task {tid}: cancelled" in line for line in lines), lines
