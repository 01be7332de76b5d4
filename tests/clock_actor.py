"""A process that takes part in the Redis side of the fleet on command, for the one-clock
tests (``tests/test_one_clock_redis.py``): run under ``tests/skew.py``'s shifted clock, it
is a host whose wall clock is off, contending with honest ones for run-locks, a lane's
fast-path reservations and the beat leader lease.

``python -m tests.clock_actor`` reads one JSON command a line on stdin and answers one JSON
line on stdout (``{"re": <op>, ...}``); things that happen on their own (this process took
the beat lease, or lost it) are lines ``{"event": ...}``. Its settings come from the
environment (``REDIS_URL``, ``AUTONOMY_REDIS_PREFIX``, ...), as any process's do. It exits
when stdin closes; a test kills it with SIGKILL to play a crashed host.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from app.errors import AutonomyError
from app.storage import beat_guard, leader, leases, locks
from app.storage.context import Context

_out = threading.Lock()


def say(**line: Any) -> None:
    with _out:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


class Actor:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.held: dict[str, tuple[threading.Event, threading.Thread]] = {}
        self.stop = threading.Event()

    def now(self) -> dict[str, Any]:
        return {"ms": int(time.time() * 1000)}  # this process's (shifted) clock

    def check(self, lane: str, worker: str) -> dict[str, Any]:
        got = leases.check(self.ctx, assignee=lane, worker=worker)
        if got is None:
            return {"code": None}
        return {"code": got.code, "claiming": got.claiming, "taskIds": list(got.task_ids)}

    def acquire(self, job: str, budget_ms: int, holder: str) -> dict[str, Any]:
        """One try, no heartbeat: the lock lives its TTL (budget + grace), then lapses."""
        token = locks.acquire(self.ctx, job, budget_ms=budget_ms, holder=holder)
        if token is not None:
            return {"token": token}
        return {"token": None, **(locks.holder_of(self.ctx, job) or {})}

    def hold(self, job: str, budget_ms: int, holder: str) -> dict[str, Any]:
        """Take the lock and keep it beating until ``release``."""
        got: dict[str, Any] = {}
        ready, done = threading.Event(), threading.Event()

        def run() -> None:
            try:
                with locks.held(self.ctx, job, budget_ms=budget_ms, holder=holder) as h:
                    got["token"] = h.token
                    ready.set()
                    done.wait()
            except locks.AlreadyRunning as e:
                got.update(token=None, holder=e.holder, elapsedMs=e.elapsed_ms)
                ready.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        ready.wait()
        if got.get("token"):
            self.held[job] = (done, t)
        return got

    def release(self, job: str) -> dict[str, Any]:
        done, t = self.held.pop(job)
        done.set()
        t.join()
        return {"released": True}

    def locks(self) -> dict[str, Any]:
        return {"locks": locks.collect_run_locks(self.ctx)}

    def lead(self, holder: str) -> dict[str, Any]:
        def lost() -> None:
            say(event="lost", holder=holder)
            self.stop.set()

        def run() -> None:
            if beat_guard.lead(self.ctx, holder=holder, stop=self.stop, on_lost=lost):
                say(event="leads", holder=holder)

        threading.Thread(target=run, daemon=True).start()
        return {"started": True}

    def view(self) -> dict[str, Any]:
        return {"view": leader.view(self.ctx)}

    def probe(self, prefix: str) -> dict[str, Any]:
        return {"role": leader.heartbeat_of(self.ctx, prefix)}


def main() -> None:
    ctx = Context.from_settings()
    actor = Actor(ctx)
    say(event="ready", ms=int(time.time() * 1000))
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            answer = getattr(actor, op)(**cmd)
        except AutonomyError as e:
            answer = {"error": e.code, "message": str(e)}
        say(re=op, **answer)
    actor.stop.set()


if __name__ == "__main__":
    main()
