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


def drain(target: Callable[..., None], cfg: dict[str, Any], *, procs: int, jobs: int,
          timeout_s: float = 600) -> dict[str, Any]:
    """Start a fleet on a queue already holding ``jobs`` jobs; time it until the handlers
    ran that many; check exactly-once."""
    fleet = Fleet(target, cfg, procs)
    fleet.shared.target.value = jobs
    fleet.start()
    t0 = fleet.go()
    finished = fleet.wait_done(timeout_s)
    elapsed = time.perf_counter() - t0
    reports = fleet.stop()
    ids = [i for r in reports for i in r["ids"]]
    executions = fleet.shared.executions.value
    return {"throughput": executions / elapsed if finished else 0.0,
            "elapsedS": round(elapsed, 3), "executions": executions,
            "distinct": len(set(ids)), "finished": finished,
            "exactlyOnce": finished and executions == jobs and len(set(ids)) == jobs
            and len(ids) == jobs}
