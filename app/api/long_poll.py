"""Long-poll claims (``claim`` with ``waitMs``) that wait without a thread each.

A waiting claim is a coroutine awaiting an asyncio future, not a thread blocked on Redis:
the process keeps one *feeder* thread per lane that has waiters, which waits on the lane
through push pickup's public wait (``pickup.wait``) and hands each turn it gets
(``"wake"``, ``"poll"``) to one waiting claim, in the order they came. Only a claim that
was handed a turn runs the database claim, in the threadpool (``lanes.claim_steps``: the
same steps, checks and answers as an in-process claim). So 1,000 waiting HTTP workers on
one lane cost this process 1,000 futures and one thread, not 1,000 threads.

A client that disconnects while its claim waits is noticed (its ``http.disconnect``): the
wait is dropped, a turn it had been handed goes to the next waiter (or back onto the
lane's wake list), and a lease granted meanwhile is released, so none waits out its
expiry for a worker that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from anyio import CancelScope
from anyio.to_thread import run_sync
from starlette.requests import Request
from starlette.types import Receive

from app import principal
from app.ops import lanes
from app.storage import pickup  # layer: the feeder waits on push pickup, as lanes.claim does
from app.storage.context import Context

log = logging.getLogger(__name__)

FEED_SLICE_S = 1.0  # a feeder's wait per call: it notices a lane without waiters this soon


class Turns:
    """The waiting claims of one API process, per lane, fed by one thread per lane.

    Queues are touched under ``_lock``; futures are resolved on the event loop only."""

    def __init__(self, ctx: Context, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self._lock = threading.Lock()
        self._queues: dict[str, deque[asyncio.Future[str]]] = {}
        self._feeders: dict[str, threading.Thread] = {}
        self._closed = False

    def waiting(self) -> int:
        """Claims of this process waiting for a turn now."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def feeders(self) -> int:
        """Feeder threads running now (one per lane with waiters)."""
        with self._lock:
            return len(self._feeders)

    async def wait(self, lane: str, timeout_s: float) -> str:
        """Wait up to ``timeout_s`` for a turn on the lane: ``"wake"``, ``"poll"``, or
        ``"timeout"``. Cancelled, it passes on a turn it was handed."""
        fut: asyncio.Future[str] = self.loop.create_future()
        with self._lock:
            closed = self._closed
            if not closed:
                self._queues.setdefault(lane, deque()).append(fut)
                if lane not in self._feeders:
                    t = threading.Thread(target=self._feed, args=(lane,), daemon=True,
                                         name=f"autonomy-long-poll-{lane}"[:60])
                    self._feeders[lane] = t
                    t.start()
        if closed:  # the server stops: no turn will come (and no loop of claims)
            await asyncio.sleep(max(0.0, timeout_s))
            return "timeout"
        try:
            await asyncio.wait({fut}, timeout=max(0.0, timeout_s))
        except asyncio.CancelledError:
            if not self._unqueue(lane, fut) and not fut.cancelled():
                self._give(lane, fut.result())  # handed a turn it cannot use: pass it on
            raise
        # a future leaves the queue only by being handed a turn (on this loop): either
        # it still waits there, or it holds its turn
        if self._unqueue(lane, fut):
            return "timeout"
        return fut.result()

    def _unqueue(self, lane: str, fut: asyncio.Future[str]) -> bool:
        """Take a waiter that was handed nothing out of the queue (True), else False."""
        with self._lock:
            q = self._queues.get(lane)
            if q is not None and fut in q:
                q.remove(fut)
                fut.cancel()
                return True
        return False

    def _give(self, lane: str, turn: str) -> None:
        """On the loop: hand ``turn`` to the lane's longest waiter (every waiter while
        Redis cannot say: the database decides each claim); a wake nobody takes goes back
        onto the lane's wake list for another process."""
        everyone = turn == "poll" and not self.ctx.redis_health.usable()
        handed = False
        with self._lock:
            q = self._queues.get(lane)
            while q:
                fut = q.popleft()
                if fut.done():
                    continue
                fut.set_result(turn)
                handed = True
                if not everyone:
                    break
        if not handed and turn == "wake":
            self.loop.run_in_executor(None, self._wake_back, lane)

    def _wake_back(self, lane: str) -> None:
        pickup.wake(self.ctx, assignee=lane)

    def _feed(self, lane: str) -> None:
        """The lane's feeder: wait through push pickup while the lane has waiters here."""
        while True:
            with self._lock:
                if self._closed or not self._queues.get(lane):
                    self._queues.pop(lane, None)
                    self._feeders.pop(lane, None)
                    return
            try:
                got = pickup.wait(self.ctx, assignee=lane, timeout_s=FEED_SLICE_S)
            except Exception as e:  # never leave the lane's waiters without a feeder
                log.warning("long poll: waiting on lane %s failed: %s", lane, e)
                time.sleep(FEED_SLICE_S / 2)  # not a loop of claims: one per half slice
                got = "poll"
            if got == "timeout":
                continue
            try:
                self.loop.call_soon_threadsafe(self._give, lane, got)
            except RuntimeError:  # the loop closed: the process is stopping
                return

    def close(self) -> None:
        """Stop feeding (the server is stopping); waiters time out on their own."""
        with self._lock:
            self._closed = True


def turns(request: Request, ctx: Context) -> Turns:
    """The app's ``Turns`` (made on first use, on the running loop)."""
    state = request.app.state
    got: Turns | None = getattr(state, "long_poll_turns", None)
    if got is None or got.loop is not asyncio.get_running_loop():
        got = state.long_poll_turns = Turns(ctx, asyncio.get_running_loop())
    return got


async def _disconnected(receive: Receive) -> None:
    """Returns when the client goes away (the body was read already: the next message
    is ``http.disconnect``)."""
    while True:
        if (await receive())["type"] == "http.disconnect":
            return


def _step(steps: lanes.ClaimSteps, sent: str | None, who: principal.Principal | None
          ) -> tuple[str, Any]:
    """Run the claim up to its next wait: ``("wait", seconds)`` or ``("done", answer)``."""
    with principal.acting(who):
        try:
            return "wait", next(steps) if sent is None else steps.send(sent)
        except StopIteration as done:
            return "done", done.value


def _release(ctx: Context, answer: dict[str, Any], who: principal.Principal | None) -> None:
    """Give back a lease granted to a client that went away."""
    with principal.acting(who):
        try:
            lanes.release(ctx, task_id=answer["task"]["id"],
                          lease_token=answer["lease"]["token"], actor="long-poll")
        except Exception as e:  # its lease expires instead
            log.warning("long poll: could not release the lease of task %s granted to a "
                        "client that went away: %s", answer["task"]["id"], e)


async def claim(request: Request, ctx: Context, fields: dict[str, Any],
                who: principal.Principal | None) -> dict[str, Any] | None:
    """Run a checked ``claim`` request with ``waitMs``: its answer, or None when the
    client went away first (any lease granted to it released)."""
    lane: str = fields["assignee"]
    steps = lanes.claim_steps(ctx, assignee=lane, worker=fields.get("worker"),  # type: ignore[arg-type]
                              wait_ms=fields.get("waitMs"),
                              clock_skew_ms=fields.get("clockSkewMs"))
    hub = turns(request, ctx)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        with CancelScope(shield=True):
            kind, value = await run_sync(_step, steps, None, who)
        while kind == "wait":
            waited = asyncio.ensure_future(hub.wait(lane, value))
            await asyncio.wait({waited, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not waited.done():  # the client went away while its claim waited
                waited.cancel()
                await asyncio.gather(waited, return_exceptions=True)
                steps.close()
                return None
            with CancelScope(shield=True):
                kind, value = await run_sync(_step, steps, waited.result(), who)
        answer: dict[str, Any] = value
        if gone.done() and answer.get("lease"):
            with CancelScope(shield=True):
                await run_sync(_release, ctx, answer, who)
            return None
        return answer
    finally:
        gone.cancel()
