"""Bench 13: what ``autonomy worker -- CMD`` costs a task beyond CMD itself (issue 22,
item 2).

Figure: CPU per task of the shipped command runner (``CommandRunner.handle_job``, the
handler under ``autonomy worker -- CMD``) running ``true``: this process's CPU (user +
system, every thread), its reaped children's and the command watchdog's (read from
``/proc``, it is reaped only at exit). Baseline: a bare spawn of the same ``true``
(``os.posix_spawn`` + ``waitpid``: what a fork/exec costs at the least), same process, same
run. Target: ratio <= 3.

Beside it, the same run: the runner as it was before (the parent-death signal set by a
``preexec_fn``, which sends ``subprocess`` down its ``fork`` path; forced here with the
launcher turned off), and a whole ``LaneWorker`` on SQLite running ``true`` per task against
one whose handler does nothing (same claims and completes: the difference is what the
command costs inside the worker), and the whole ``autonomy worker -- true`` process (the
issue's measurement: 1 + N tasks less 1 task, its CPU and its children's). Interleaved
rounds, median. The process imports what the worker imports, so a ``fork`` copies a
worker-sized address space.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from app.clock import utcnow
from app.storage import store
from app.storage.db import transaction
from app.workers import command
from app.workers.client import LocalClient
from app.workers.command import CommandRunner
from app.workers.job import Job
from app.workers.lane_worker import LaneWorker
from bench.common import Env, Row
from bench.seed import seed_todo

TRUE = ["true"]


def _cpu_s() -> float:
    """This process's CPU and its reaped children's, plus the live watchdog's."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _watchdog_cpu_s()


def _watchdog_cpu_s() -> float:
    proc = command._WATCHDOG._proc
    if proc is None:
        return 0.0
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _job(i: int) -> Job:
    return Job(task={"id": i, "title": "bench", "payload": {}, "attempts": 0},
               lease_token="bench", lease_expires_at=None, lane="bench", worker="bench",
               stopping=threading.Event())


def _cpu_ms_per_call(fn: Callable[[int], Any], n: int) -> float:
    fn(0)  # warm
    c0 = _cpu_s()
    for i in range(n):
        fn(i)
    return (_cpu_s() - c0) / n * 1e3


def bare_spawn(_i: int) -> None:
    """The baseline: spawn ``true`` and reap it, nothing else."""
    os.waitpid(os.posix_spawnp(TRUE[0], TRUE, os.environ), 0)


def runner_call(use_launcher: bool) -> Callable[[int], Any]:
    runner = CommandRunner(TRUE)
    found = command._launcher()

    def call(i: int) -> Any:
        command._LAUNCHER[:] = [found if use_launcher else None]
        try:
            return runner.handle_job(_job(i))
        finally:
            command._LAUNCHER[:] = [found]
    return call


def _interleaved(fns: dict[str, Callable[[int], Any]], *, n: int, rounds: int
                 ) -> dict[str, float]:
    seen: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seen[name].append(_cpu_ms_per_call(fn, n))
    return {k: statistics.median(v) for k, v in seen.items()}


def _worker_ms_per_task(env: Env, *, n: int, rounds: int) -> dict[str, float]:
    """Whole LaneWorkers on SQLite: ``true`` per task, and a handler that does nothing."""
    settings = env.settings(env.sqlite_database())
    client = LocalClient(settings=settings)
    lanes = {"true": CommandRunner(TRUE), "noop": lambda _task: None}
    try:
        with transaction(client.ctx.engine) as conn:
            for lane in lanes:
                store.ensure_lane(conn, assignee=f"b13{lane}", now=utcnow(), max_in_flight=1)
        for lane in lanes:
            seed_todo(client.ctx.engine, assignee=f"b13{lane}", n=(n + 1) * rounds + 2,
                      now=utcnow())
        seen: dict[str, list[float]] = {k: [] for k in lanes}
        for _ in range(rounds):
            for lane, handler in lanes.items():
                w = LaneWorker(f"b13{lane}", handler, worker_name=f"b13-{lane}",
                               client=client, say=lambda _line: None)
                w.run(stop_event=threading.Event(), max_tasks=1)  # warm: thread, pools
                c0 = _cpu_s()
                w.run(stop_event=threading.Event(), max_tasks=1 + n)  # n more
                seen[lane].append((_cpu_s() - c0) / n * 1e3)
        return {k: statistics.median(v) for k, v in seen.items()}
    finally:
        client.close()


def _cli_ms_per_task(env: Env, *, n: int) -> float:
    """The issue's own measurement: ``autonomy worker --max-tasks N -- true`` as a process
    (SQLite, this run's Redis prefix), its CPU and its children's, a run of ``1 + n`` tasks
    less a run of 1 (start-up), per task.

    A first run is thrown away (it compiles the bytecode a fresh checkout lacks: seen to
    cost the 1-task run more CPU than a 21-task run, a negative figure), the start-up is
    the median of three 1-task runs, and the long run has at least 100 tasks, so the
    difference stands well above the start-up's own spread."""
    n = max(n, 100)
    url = env.sqlite_database()
    client = LocalClient(settings=env.settings(url))
    try:
        with transaction(client.ctx.engine) as conn:
            store.ensure_lane(conn, assignee="b13cli", now=utcnow(), max_in_flight=1)
        seed_todo(client.ctx.engine, assignee="b13cli", n=n + 10, now=utcnow())
    finally:
        client.close()
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    cli_env.update(DATABASE_URL=url, REDIS_URL=env.redis_url,
                   AUTONOMY_REDIS_PREFIX=env.prefix)

    def cpu_of(tasks: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "app.cli", "worker", "--lane", "b13cli",
                        "--name", "b13-cli", "--max-tasks", str(tasks), "--", *TRUE],
                       env=cli_env, check=True, capture_output=True, timeout=600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    cpu_of(1)  # warm-up, not counted
    one = sorted(cpu_of(1) for _ in range(3))[1]
    return (cpu_of(1 + n) - one) / n * 1e3


def run(env: Env) -> list[Row]:
    n, rounds = env.size(300, 20), env.size(5, 1)
    load = os.getloadavg()
    got = _interleaved({"bare": bare_spawn, "runner": runner_call(True),
                        "preexec": runner_call(False)}, n=n, rounds=rounds)
    worker = _worker_ms_per_task(env, n=n, rounds=max(1, rounds // 2))
    cli = _cli_ms_per_task(env, n=n)
    launcher = command._launcher()
    common = {"tasksPerRound": n, "rounds": rounds, "loadavg": [round(x, 1) for x in load],
              "launcher": " ".join(launcher) if launcher else None,
              "bareMs": round(got["bare"], 3)}
    return [
        Row(bench=13, what="`autonomy worker -- true`: the command runner, CPU a task "
                           "(worker + children)",
            figure=got["runner"], unit="ms CPU/task", baseline=got["bare"],
            baseline_what="bare posix_spawn + waitpid of `true`", target="<= 3",
            details={**common, "runnerMs": round(got["runner"], 3),
                     "beforeMs": round(got["preexec"], 3)}),
        Row(bench=13, what="the runner before issue 22 (preexec_fn: a fork of the worker)",
            figure=got["preexec"], unit="ms CPU/task", baseline=got["bare"],
            baseline_what="bare posix_spawn + waitpid of `true`", target="report",
            details=common),
        Row(bench=13, what="whole LaneWorker on SQLite running `true` per task",
            figure=worker["true"], unit="ms CPU/task", baseline=worker["noop"],
            baseline_what="the same worker, a handler that does nothing", target="report",
            details={**common, "runnerShareMs": round(worker["true"] - worker["noop"], 3)}),
        Row(bench=13, what="the whole `autonomy worker -- true` process on SQLite (claim + "
                           "complete, logs, runner), beyond start-up",
            figure=cli, unit="ms CPU/task", baseline=got["bare"],
            baseline_what="bare posix_spawn + waitpid of `true`", target="report",
            details=common),
    ]
