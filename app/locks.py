"""Run-locks: at most one run of each periodic job at a time, and every held lock visible.

A lock is a hash ``lock:{job}`` (``token holder startedAt budgetMs``) that lives budget +
grace, a heartbeat key ``lock:{job}:beat`` that lives ``lock_holder_dead_after_ms`` and is
set again while the holder runs, and a member of the registry zset ``locks``, so that
``collect_run_locks`` lists every held lock in one round trip without scanning the
keyspace. Acquire, extend and release compare the token inside one Lua script: a holder
whose lock expired can never extend or release the next holder's lock.

A lock whose heartbeat is gone belongs to a dead holder; self-heal breaks it
(``break_dead_locks``). A lock that is over budget but still beating is reported
(``overBudget``), never broken.

The scripts build the per-job key names from the prefix (``ARGV``) when they walk the
registry; that is fine on one Redis server (the SPEC's deployment), not on Redis Cluster.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from app.clock import from_ms, iso, to_ms
from app.context import Context
from app.errors import AutonomyError
from app.redis_conn import redis_errors


class AlreadyRunning(AutonomyError):
    """Raised when a job's run-lock is held by another run."""

    code = "already_running"
    http_status = 409

    def __init__(self, job: str, holder: str | None, elapsed_ms: int | None) -> None:
        super().__init__(f"{job} is already running (held by {holder}, {elapsed_ms} ms)",
                         job=job, holder=holder, elapsedMs=elapsed_ms)
        self.job, self.holder, self.elapsed_ms = job, holder, elapsed_ms


# KEYS[1] lock hash, KEYS[2] beat key, KEYS[3] registry zset
# ARGV[1] token, ARGV[2] holder, ARGV[3] now ms, ARGV[4] budget ms, ARGV[5] lock ttl ms,
# ARGV[6] beat ttl ms, ARGV[7] job
# -> {1} acquired | {0, holder, startedAt} held by another
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local h = redis.call('HMGET', KEYS[1], 'holder', 'startedAt')
  return {0, h[1] or '', h[2] or ''}
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'holder', ARGV[2], 'startedAt', ARGV[3],
           'budgetMs', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[7])
return {1}
"""

# KEYS[1] lock hash, KEYS[2] beat key
# ARGV[1] token, ARGV[2] budget ms ('' keeps it), ARGV[3] grace ms, ARGV[4] beat ttl ms
# -> 1 extended | 0 not the holder (or the lock is gone). The TTL is *set* to budget + grace.
_EXTEND = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'budgetMs', ARGV[2]) end
local budget = tonumber(redis.call('HGET', KEYS[1], 'budgetMs')) or 0
redis.call('PEXPIRE', KEYS[1], budget + tonumber(ARGV[3]))
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return 1
"""

# KEYS[1] lock hash, KEYS[2] beat key, KEYS[3] registry zset
# ARGV[1] token, ARGV[2] job, ARGV[3] '1' = only when the holder's beat is gone
# -> 1 released | 0 not the holder | 2 the holder still beats (left alone)
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS[1] registry zset; ARGV[1] key prefix
# -> flat list of {job, token, holder, startedAt, budgetMs, beating} per held lock; registry
#    members whose lock expired are removed on the way (their lock is no longer held).
_COLLECT = """
local out = {}
local jobs = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, job in ipairs(jobs) do
  local k = ARGV[1] .. 'lock:' .. job
  local h = redis.call('HMGET', k, 'token', 'holder', 'startedAt', 'budgetMs')
  if h[1] then
    local beating = redis.call('EXISTS', k .. ':beat')
    out[#out + 1] = job; out[#out + 1] = h[1]; out[#out + 1] = h[2] or ''
    out[#out + 1] = h[3] or '0'; out[#out + 1] = h[4] or '0'; out[#out + 1] = beating
  else
    redis.call('ZREM', KEYS[1], job)
  end
end
return out
"""

_FIELDS = 6


def _script(ctx: Context, name: str, body: str) -> Any:
    cache = ctx.__dict__.setdefault("_lock_scripts", {})
    if name not in cache:
        cache[name] = ctx.redis.register_script(body)
    return cache[name]


def default_holder(task_id: str | None = None) -> str:
    """``host:pid:task`` -- who holds a lock, readable in the status payload."""
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or 'inline'}"


def _ttls(ctx: Context, budget_ms: int) -> tuple[int, int]:
    s = ctx.settings
    return int(budget_ms) + s.lock_grace_ms, s.lock_holder_dead_after_ms


def acquire(ctx: Context, job: str, *, budget_ms: int, holder: str | None = None) -> str | None:
    """Take ``job``'s run-lock for ``budget_ms``; answers its token, or None when held.

    Raises ``RedisUnavailable`` when Redis cannot be reached.
    """
    token = uuid.uuid4().hex
    lock_ttl, beat_ttl = _ttls(ctx, budget_ms)
    k = ctx.keys
    with redis_errors(ctx.redis):
        got = _script(ctx, "acquire", _ACQUIRE)(
            keys=[k.lock(job), k.lock_beat(job), k.lock_registry()],
            args=[token, holder or default_holder(), to_ms(ctx.clock()), int(budget_ms),
                  lock_ttl, beat_ttl, job])
    return token if int(got[0]) == 1 else None


def holder_of(ctx: Context, job: str) -> dict[str, Any] | None:
    """The current holder of ``job``'s lock (``holder``, ``elapsedMs``), or None."""
    with redis_errors(ctx.redis):
        h = ctx.redis.hmget(ctx.keys.lock(job), "holder", "startedAt")
    if h[0] is None:
        return None
    return {"holder": h[0], "elapsedMs": max(0, to_ms(ctx.clock()) - int(h[1] or 0))}


def extend(ctx: Context, job: str, token: str, *, budget_ms: int | None = None) -> bool:
    """Set the lock's TTL (budget + grace) and its heartbeat again, optionally with a new
    budget; False if ``token`` no longer holds it (nothing done)."""
    s = ctx.settings
    with redis_errors(ctx.redis):
        ok = _script(ctx, "extend", _EXTEND)(
            keys=[ctx.keys.lock(job), ctx.keys.lock_beat(job)],
            args=[token, "" if budget_ms is None else int(budget_ms), s.lock_grace_ms,
                  s.lock_holder_dead_after_ms])
    return bool(ok)


def beat(ctx: Context, job: str, token: str) -> bool:
    """The holder's heartbeat: keeps the lock alive; False if it is no longer ours."""
    return extend(ctx, job, token)


def release(ctx: Context, job: str, token: str) -> bool:
    """Release ``job``'s lock if ``token`` still holds it; False otherwise (nothing done)."""
    return _release(ctx, job, token, only_dead=False) == 1


def _release(ctx: Context, job: str, token: str, *, only_dead: bool) -> int:
    k = ctx.keys
    with redis_errors(ctx.redis):
        return int(_script(ctx, "release", _RELEASE)(
            keys=[k.lock(job), k.lock_beat(job), k.lock_registry()],
            args=[token, job, "1" if only_dead else "0"]))


def _collect_raw(ctx: Context) -> list[dict[str, Any]]:
    with redis_errors(ctx.redis):
        flat = _script(ctx, "collect", _COLLECT)(keys=[ctx.keys.lock_registry()],
                                                 args=[ctx.settings.redis_prefix])
    now_ms = to_ms(ctx.clock())
    out = []
    for i in range(0, len(flat), _FIELDS):
        job, token, holder, started, budget, beating = flat[i:i + _FIELDS]
        started_ms, budget_ms = int(started), int(budget)
        elapsed = max(0, now_ms - started_ms)
        out.append({"job": job, "holder": holder, "startedAt": iso(from_ms(started_ms)),
                    "elapsedMs": elapsed, "budgetMs": budget_ms,
                    "overBudget": elapsed > budget_ms, "holderAlive": int(beating) == 1,
                    "_token": token})
    return out


def collect_run_locks(ctx: Context) -> list[dict[str, Any]]:
    """Every held run-lock, oldest first, in one round trip: ``job``, ``holder``,
    ``startedAt``, ``elapsedMs``, ``budgetMs``, ``overBudget``, ``holderAlive``."""
    return [{k: v for k, v in lk.items() if k != "_token"} for lk in _collect_raw(ctx)]


def break_dead_locks(ctx: Context) -> list[dict[str, Any]]:
    """Release every lock whose holder stopped beating; answers the ones released.

    The check and the delete are one Lua step on the token seen, so a lock taken again in
    between, or whose holder beats again, is left alone.
    """
    broken = []
    for lk in _collect_raw(ctx):
        if lk["holderAlive"]:
            continue
        if _release(ctx, lk["job"], lk.pop("_token"), only_dead=True) == 1:
            broken.append(lk)
    return broken


@dataclass
class Held:
    """A held run-lock while its job runs; ``lost`` turns True if the lock was taken away."""

    job: str
    token: str
    holder: str
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)


@contextmanager
def held(ctx: Context, job: str, *, budget_ms: int, holder: str | None = None
         ) -> Iterator[Held]:
    """Hold ``job``'s lock while the block runs, beating every
    ``lock_heartbeat_interval_ms``; release it after. Raises ``AlreadyRunning`` when held.
    """
    who = holder or default_holder()
    token = acquire(ctx, job, budget_ms=budget_ms, holder=who)
    if token is None:
        cur = holder_of(ctx, job) or {}
        raise AlreadyRunning(job, cur.get("holder"), cur.get("elapsedMs"))
    h = Held(job=job, token=token, holder=who)
    beater = threading.Thread(target=_beat_until_stopped, args=(ctx, h),
                              name=f"run-lock-{job}", daemon=True)
    beater.start()
    try:
        yield h
    finally:
        h._stop.set()
        beater.join()
        release(ctx, job, token)


def _beat_until_stopped(ctx: Context, h: Held) -> None:
    interval_s = ctx.settings.lock_heartbeat_interval_ms / 1000
    while not h._stop.wait(interval_s):
        try:
            if not beat(ctx, h.job, h.token):
                h.lost = True
                return
        except AutonomyError:
            continue  # Redis blipped: try again next beat, well inside the beat TTL
