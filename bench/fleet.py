"""Worker fleets for benches 8 and 9: start N worker processes of one system, release them
together, count what their handlers ran.

Every system's handler does the same bookkeeping: it adds one to a counter shared by the
fleet (``executions``) and notes the job's id; when the counter reaches the number of jobs
the fleet's ``done`` event is set. Exactly-once is then judged from the executions
counter (never more than the jobs) and the ids noted (every job, once).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SPAWN = mp.get_context("spawn")


@dataclass
class Shared:
    """What the parent and a fleet's processes share."""

    executions: Any = field(default_factory=lambda: SPAWN.Value("i", 0))
    target: Any = field(default_factory=lambda: SPAWN.Value("i", 0))
    ready: Any = field(default_factory=lambda: SPAWN.Semaphore(0))
    go: Any = field(default_factory=SPAWN.Event)
    done: Any = field(default_factory=SPAWN.Event)
    stop: Any = field(default_factory=SPAWN.Event)
    out: Any = field(default_factory=SPAWN.Queue)
    # pickup: the parent stamps when it created a job (perf_counter is monotonic and
    # system-wide on Linux), the handler when it starts; both in ms
    created: Any = field(default_factory=lambda: SPAWN.Array("d", 4096, lock=False))
    started: Any = field(default_factory=lambda: SPAWN.Array("d", 4096, lock=False))


class Recorder:
    """A worker process's side of ``Shared``: call ``ran(job_id, seq)`` in the handler."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.ids: list[Any] = []

    def ran(self, job_id: Any, seq: int | None = None) -> None:
        now_ms = time.perf_counter() * 1000
        if seq is not None and 0 <= seq < len(self.shared.started):
            self.shared.started[seq] = now_ms
        self.ids.append(job_id)
        with self.shared.executions.get_lock():
            self.shared.executions.value += 1
            n = self.shared.executions.value
        if n >= self.shared.target.value > 0:
            self.shared.done.set()

    def started(self) -> None:
        """Connected and warm: wait for the fleet's go."""
        self.shared.ready.release()
        self.shared.go.wait()

    def on_stop(self, fn: Callable[[], None]) -> threading.Thread:
        """Call ``fn`` (in a thread) once the parent says stop."""
        def watch() -> None:
            self.shared.stop.wait()
            fn()

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        return t

    def report(self, **extra: Any) -> None:
        self.shared.out.put({"ids": self.ids, **extra})


class Fleet:
    """N processes running ``target(cfg, name, shared)`` (``cfgs``: one cfg each)."""

    def __init__(self, target: Callable[..., None], cfg: dict[str, Any], procs: int, *,
                 cfgs: list[dict[str, Any]] | None = None) -> None:
        self.shared = Shared()
        cfgs = cfgs if cfgs is not None else [cfg] * procs
        self.ps = [SPAWN.Process(target=target, args=(c, f"w{i}", self.shared), daemon=True)
                   for i, c in enumerate(cfgs)]

    def start(self, *, timeout_s: float = 180) -> None:
        for p in self.ps:
            p.start()
        deadline = time.monotonic() + timeout_s
        started = 0
        while started < len(self.ps):
            if self.shared.ready.acquire(timeout=0.5):
                started += 1
            elif time.monotonic() > deadline or any(p.exitcode for p in self.ps):
                self.kill()
                raise RuntimeError("a fleet worker did not start")

    def wait_done(self, timeout_s: float) -> bool:
        """Wait for the handlers to have run the target; False on timeout or when a
        worker died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.shared.done.wait(0.2):
                return True
            if any(p.exitcode is not None for p in self.ps):
                return False
        return False

    def go(self) -> float:
        t0 = time.perf_counter()
        self.shared.go.set()
        return t0

    def stop(self, *, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Tell every worker to stop; their reports."""
        self.shared.stop.set()
        reports = []
        deadline = time.monotonic() + timeout_s
        while len(reports) < len(self.ps) and time.monotonic() < deadline:
            try:
                reports.append(self.shared.out.get(timeout=0.5))
            except Exception:  # queue.Empty: a worker still finishing
                if all(not p.is_alive() for p in self.ps) and self.shared.out.empty():
                    break
        for p in self.ps:
            p.join(max(0.1, deadline - time.monotonic()))
        self.kill()
        return reports

    def kill(self) -> None:
        for p in self.ps:  # only the processes this fleet started
            if p.is_alive():
                p.terminate()
                p.join(10)


def _cpu_s(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process (and its children) still running."""
    import psutil

    out: dict[int, float] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in (proc, *proc.children(recursive=True)):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


class PgCost:
    """What a drain cost PostgreSQL, from the server's own books: transactions committed in
    the bench's database (``pg_stat_database.xact_commit``: reads included; read once the
    fleet's connections are closed, since a backend flushes its counts on exit and
    otherwise only now and then), and CPU of the backends serving it plus the server's
    background processes (WAL writer, checkpointer, ...; from ``/proc``: the server runs on
    this machine) from go to done -- a backend started during the drain counts whole."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self._conn = psycopg.connect(dsn, autocommit=True)
        self.before = set(self._pids())  # made before the fleet connects: not its own
        self.commits0, self.cpu0 = 0, {}

    def mark(self) -> None:
        """The start: the fleet connected and warm."""
        self.commits0, self.cpu0 = self._commits(), _cpu_s(self._pids())

    def _pids(self) -> list[int]:
        return [int(r[0]) for r in self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE (datname = current_database()"
            " OR backend_type <> 'client backend') AND pid <> pg_backend_pid()").fetchall()]

    def _commits(self) -> int:
        self._conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(self._conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0])

    def cpu_s(self) -> float:
        """CPU spent since the start."""
        cpu = _cpu_s(list({*self.cpu0, *self._pids()}))
        return sum(v - self.cpu0.get(pid, 0.0) for pid, v in cpu.items())

    def commits(self, *, timeout_s: float = 10.0) -> float:
        """Transactions committed since the start, once the database's other backends
        have gone (closed by their fleet: their counts flushed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and set(self._pids()) - self.before:
            time.sleep(0.1)
        out = float(self._commits() - self.commits0)
        self._conn.close()
        return out


def drain(target: Callable[..., None], cfg: dict[str, Any], *, procs: int, jobs: int,
          timeout_s: float = 600, pg_dsn: str | None = None) -> dict[str, Any]:
    """Start a fleet on a queue already holding ``jobs`` jobs; time it until the handlers
    ran that many; check exactly-once. Also what it cost per task (``cost``): the
    workers' CPU from go to done and, with ``pg_dsn`` (the bench's database),
    PostgreSQL's CPU and commits over the same span."""
    fleet = Fleet(target, cfg, procs)
    fleet.shared.target.value = jobs
    pg = PgCost(pg_dsn) if pg_dsn else None
    fleet.start()
    pids = [p.pid for p in fleet.ps if p.pid is not None]
    if pg:
        pg.mark()
    cpu0 = _cpu_s(pids)
    t0 = fleet.go()
    finished = fleet.wait_done(timeout_s)
    elapsed = time.perf_counter() - t0
    cpu1 = _cpu_s(pids)
    worker_cpu = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
    pg_cpu = pg.cpu_s() if pg else 0.0
    n = max(1, fleet.shared.executions.value)
    cost = {"workerCpuMsPerTask": round(1000 * worker_cpu / n, 3)}
    reports = fleet.stop()
    if pg:
        cost |= {"pgCpuMsPerTask": round(1000 * pg_cpu / n, 3),
                 "pgCommitsPerTask": round(pg.commits() / n, 3)}
    ids = [i for r in reports for i in r["ids"]]
    executions = fleet.shared.executions.value
    return {"throughput": executions / elapsed if finished else 0.0,
            "elapsedS": round(elapsed, 3), "executions": executions,
            "distinct": len(set(ids)), "finished": finished,
            "exactlyOnce": finished and executions == jobs and len(set(ids)) == jobs
            and len(ids) == jobs, "cost": cost}
