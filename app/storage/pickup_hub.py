"""One blocked wait per process: the waiting claims of a context share one Redis connection.

``pickup.wait`` used to block each waiting claim on the lane's wake list itself, re-armed
every couple of seconds with a safety-poll ``SET NX`` beside it: about 2 Redis commands a
second per idle worker (issue 22). Here the waiters of a context wait on in-process events
instead, and one thread (the *blocker*) holds one ``BRPOP`` over the wake lists of the
lanes they wait on, re-armed every ``pickup_block_s``: a wake popped is handed to one local
waiter. A lane that gains its first waiter while the blocker is blocked on others gets in
by ``CLIENT UNBLOCK`` (once per such change, not per claim).

The safety poll (one claim per ``pickup_safety_poll_ms`` per lane, fleet-wide) is led by
one process per lane, which holds ``lane:{assignee}:poll`` (``SET NX PX``: its token for
``pickup_block_s``, not renewed -- it takes the key again just after it expired, ahead of
the others, who try once per ``pickup_block_s``). The leader's *ticker* thread hands one
of its waiters a ``"poll"`` turn each period -- a claim the database answers alone (no
Redis command while the lane is empty) -- and a ``"due"`` turn when a delayed task the
lane's waiters read of (``note_due``) falls due (one process per due instant,
``take_due_turn``). So an idle process costs Redis about two commands per
``pickup_block_s`` (one ``BRPOP``, one ``SET``), whatever its number of waiters; a leader
that died is replaced within 2 x ``pickup_block_s``.

A wake popped while no waiter of its lane is here (one is between two claims) is kept
``GRACE_S`` for the next, then pushed back for other processes. Nothing here is an
authority: a turn is only a hint to claim now, and the database decides.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from functools import partial
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from app.storage.context import Context
from app.storage.redis_errors import ANY_REDIS_ERROR, describe
from app.storage.redis_scripts import Script, run_script

log = logging.getLogger(__name__)

GRACE_S = 0.05  # a popped wake waits this long for a waiter between two claims
LINGER_S = 2.0  # a lane stays in the blocked wait this long after its last waiter left
HEALTH_S = 1.0  # a waiter looks at Redis's health this often (no command: a flag), and
# leaves for the database's wait once Redis has been degraded this long: a busy machine's
# short episode (two missed deadlines, then an answer) does not send a fleet polling

# KEYS[1] the lane's poll key; ARGV[1] this process's token: let go of the lead if ours
_UNLEAD = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


class _Waiter:
    __slots__ = ("event", "turn")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.turn: str | None = None


class Hub:
    """The waiting claims of one context (see the module docstring). Thread-safe."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.pid = os.getpid()  # a forked child makes a hub of its own (threads do not fork)
        s = ctx.settings
        self.block_s = s.pickup_block_s
        self.poll_s = s.pickup_safety_poll_ms / 1000
        self.token = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiters: dict[str, deque[_Waiter]] = {}
        self._pending: dict[str, int] = {}  # wakes popped that no waiter took yet
        self._seen: dict[str, float] = {}  # lane -> when it last had a waiter here
        self._armed: frozenset[str] = frozenset()  # the lanes of the BRPOP in flight
        self._gen = 0  # counts the blocker's (re)arms
        self._client_id: int | None = None  # the blocker's connection, while blocked
        self._broken_until = 0.0  # the blocker cannot reach Redis: retry after this
        self._closed = False
        self._threads: list[threading.Thread] = []
        # the safety poll: lanes this process leads, when each was last tried, next poll
        self._lead: dict[str, float] = {}  # lane -> until when this process leads it
        self._next_try: dict[str, float] = {}  # lane -> when to try to take the lead
        self._next_poll: dict[str, float] = {}
        self._dues: dict[str, tuple[float, int]] = {}  # lane -> (monotonic, due ms)
        # the blocker's own client (a pool it alone uses: one connection, the one whose
        # CLIENT ID ``_unblock`` names), with a socket deadline past the blocked wait
        self._client = redis.Redis.from_url(
            s.effective_redis_url, decode_responses=True,
            socket_timeout=self.block_s + max(5.0, s.redis_socket_timeout_s),
            socket_connect_timeout=s.redis_socket_timeout_s, retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            maint_notifications_config=MaintNotificationsConfig(enabled=False))

    # --- waiters ------------------------------------------------------------------
    def broken(self) -> bool:
        return self._closed or time.monotonic() < self._broken_until

    def waiting(self, lane: str) -> int:
        """Claims of this process waiting on the lane now."""
        with self._lock:
            return len(self._waiters.get(lane, ()))

    def take_pending(self, lane: str) -> bool:
        """A wake popped for the lane that no waiter took yet: take it (no Redis)."""
        with self._lock:
            if self._pending.get(lane):
                self._pending[lane] -= 1
                self._changed.notify_all()
                return True
        return False

    def wait(self, lane: str, timeout_s: float) -> str:
        """Wait up to ``timeout_s`` for a turn: ``"wake"``, ``"poll"``, ``"due"``, else
        ``"timeout"``; ``"degraded"`` (at once, or within 2 x ``HEALTH_S``) while Redis
        cannot serve it: the caller waits some other way."""
        deadline = time.monotonic() + timeout_s
        w = _Waiter()
        with self._lock:
            self._seen[lane] = time.monotonic()
            if self.broken():
                self._changed.notify_all()  # the blocker retries when its backoff is up
                return "degraded"
            if self._pending.get(lane):
                self._pending[lane] -= 1
                self._changed.notify_all()
                return "wake"
            self._waiters.setdefault(lane, deque()).append(w)
            self._start()
            self._changed.notify_all()
            gen = self._gen if lane not in self._armed else None
        if gen is not None:
            self._unblock(lane, gen)
        try:
            while not w.event.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or self.broken() or self._degraded_a_while():
                    break
                w.event.wait(min(left, HEALTH_S))
        finally:
            with self._lock:
                self._seen[lane] = time.monotonic()
                if w.turn is None:
                    q = self._waiters.get(lane)
                    if q is not None and w in q:
                        q.remove(w)
        if w.turn is not None:
            return w.turn
        if self.broken() or self._degraded_a_while():
            return "degraded"
        return "timeout"

    def _degraded_a_while(self) -> bool:
        h = self.ctx.redis_health
        since = h.since
        return h.degraded and (since is None or time.time() - since >= HEALTH_S)

    def note_due(self, lane: str, in_s: float, due_ms: int) -> None:
        """The lane's next delayed task falls due in ``in_s`` (at ``due_ms``): hand a
        waiter a ``"due"`` turn then, if this process wins that instant."""
        at = time.monotonic() + max(0.0, in_s)
        with self._lock:
            old = self._dues.get(lane)
            if old is None or at < old[0]:
                self._dues[lane] = (at, due_ms)
                self._changed.notify_all()

    def _hand(self, lane: str, turn: str) -> bool:
        """Give one waiter of the lane ``turn`` (the lock held): True when one took it."""
        q = self._waiters.get(lane)
        if not q:
            return False
        w = q.popleft()
        w.turn = turn
        w.event.set()
        return True

    def _unblock(self, lane: str, gen: int) -> None:
        """Get a lane that just gained its first waiter into the blocked wait: unblock
        the blocker (which re-arms with it) unless it re-armed meanwhile."""
        from app.storage import pickup

        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with self._lock:
                cid = self._client_id
                if self._gen != gen or lane in self._armed or self._closed:
                    return
            if cid is not None:
                try:
                    if self.ctx.fast_redis.client_unblock(cid):
                        return
                except ANY_REDIS_ERROR as e:
                    pickup.note_failure(self.ctx, e, "unblock the pickup wait")
                    return
            time.sleep(0.001)  # the blocker is about to block: try again

    # --- threads ------------------------------------------------------------------
    def _start(self) -> None:
        if self._threads or self._closed:
            return
        for name, fn in (("blocker", self._blocker), ("ticker", self._ticker)):
            t = threading.Thread(target=fn, name=f"autonomy-pickup-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for q in self._waiters.values():
                for w in q:
                    w.event.set()
            self._changed.notify_all()
        self._client.connection_pool.disconnect()  # ends a BRPOP in flight
        for t in self._threads:
            t.join(5)
        led = list(self._lead)
        for lane in led:
            self._unlead(lane)
        self._client.close()

    def _lanes(self, now: float) -> list[str]:
        return sorted(lane for lane, at in self._seen.items()
                      if self._waiters.get(lane) or now - at < LINGER_S)

    def _blocker(self) -> None:
        from app.storage import pickup

        k = self.ctx.keys
        delay = 0.1
        while True:
            with self._lock:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    lanes = self._lanes(now) if now >= self._broken_until else []
                    if lanes:
                        break
                    self._armed = frozenset()
                    wait = (self._broken_until - now if now < self._broken_until
                            else LINGER_S)
                    self._changed.wait(max(0.01, wait))
                self._armed = frozenset(lanes)
                self._gen += 1
            keys = {k.lane_wake(lane): lane for lane in lanes}
            try:
                if self._client_id is None:
                    cid = int(self._client.client_id())
                    with self._lock:
                        self._client_id = cid
                got = self._client.brpop(list(keys), timeout=self.block_s)
            except ANY_REDIS_ERROR as e:
                with self._lock:
                    self._client_id = None
                    if self._closed:
                        return
                    self._broken_until = time.monotonic() + delay
                    for q in self._waiters.values():  # they wait some other way
                        while q:
                            w = q.popleft()
                            w.event.set()
                delay = min(5.0, delay * 2)
                pickup.note_failure(self.ctx, e, "block on the wake lists")
                continue
            delay = 0.1
            if got is None:
                continue
            lane = keys[str(got[0])]
            with self._lock:
                if self._hand(lane, "wake"):
                    continue
                self._pending[lane] = self._pending.get(lane, 0) + 1
                self._changed.wait_for(partial(self._taken, lane), timeout=GRACE_S)
                back = self._pending.pop(lane, 0)
            if back:  # nobody here took it: another process may
                pickup.wake(self.ctx, assignee=lane, n=back)

    def _taken(self, lane: str) -> bool:
        return not self._pending.get(lane)

    def _ticker(self) -> None:
        from app.storage import pickup

        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                lanes = self._lanes(now)
                here = {lane for lane in lanes if self._waiters.get(lane)}
                for gone in [x for x, at in self._seen.items()
                             if not self._waiters.get(x) and now - at > 10 * LINGER_S]:
                    del self._seen[gone]
                    self._waiters.pop(gone, None)
                    self._next_try.pop(gone, None)
                dues = [(lane, ms) for lane, (at, ms) in self._dues.items() if at <= now]
                for lane, _ms in dues:
                    del self._dues[lane]
            for lane in lanes:
                if now >= self._next_try.get(lane, 0.0):
                    self._try_lead(lane)
            for lane, until in list(self._lead.items()):
                if lane not in lanes or time.monotonic() >= until:
                    self._lead.pop(lane)  # not renewed: it expires by itself
                    self._next_poll.pop(lane, None)
                elif now >= self._next_poll.get(lane, 0.0):
                    self._next_poll[lane] = now + self.poll_s
                    if lane in here:
                        with self._lock:
                            self._hand(lane, "poll")
            for lane, ms in dues:
                if pickup.take_due_turn(self.ctx, assignee=lane, due_ms=ms):
                    with self._lock:
                        handed = self._hand(lane, "due")
                    if not handed:
                        pickup.wake(self.ctx, assignee=lane)
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                lanes = self._lanes(now)
                at = [now + LINGER_S]
                at += [self._next_try.get(lane, now) for lane in lanes]
                at += [self._next_poll.get(lane, now) for lane in self._lead]
                at += list(self._lead.values())
                at += [a for a, _ in self._dues.values()]
                self._changed.wait(max(0.001, min(at) - now))

    def _try_lead(self, lane: str) -> None:
        """Take the lane's safety-poll lead if nobody holds it (``SET NX PX``, one command,
        no renewal: the holder takes it again just after it expired, ahead of the others,
        who try once per ``pickup_block_s``)."""
        from app.storage import pickup

        sent = time.monotonic()
        won = False
        if not self.ctx.redis_health.degraded:  # its waiters wait some other way meanwhile
            try:
                won = bool(self.ctx.fast_redis.set(self.ctx.keys.lane_poll(lane), self.token,
                                                   nx=True, px=int(self.block_s * 1000)))
            except ANY_REDIS_ERROR as e:
                pickup.note_failure(self.ctx, e, "lead the safety poll")
        if won:
            if lane not in self._lead:
                self._next_poll[lane] = sent + self.poll_s
            self._lead[lane] = sent + self.block_s  # the key lives at least this long
            # just past the key's expiry (its clock started after ``sent``'s answer)
            self._next_try[lane] = time.monotonic() + self.block_s + 0.02
        else:
            self._next_try[lane] = sent + self.block_s

    def _unlead(self, lane: str) -> None:
        self._lead.pop(lane, None)
        self._next_poll.pop(lane, None)
        try:
            run_script(self.ctx, _UNLEAD, 1, self.ctx.keys.lane_poll(lane), self.token,
                       fast=True)
        except ANY_REDIS_ERROR as e:
            log.debug("redis: could not let go of lane %s's safety poll: %s", lane,
                      describe(e))


def hub(ctx: Context) -> Hub:
    """The context's hub, made on first use."""
    got: Any = ctx.__dict__.get("_pickup_hub")
    if got is None or got.pid != os.getpid():
        with _MAKE:
            got = ctx.__dict__.get("_pickup_hub")
            if got is None or got.pid != os.getpid():
                got = ctx.__dict__["_pickup_hub"] = Hub(ctx)
    return got


_MAKE = threading.Lock()
