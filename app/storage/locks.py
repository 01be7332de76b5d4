"""Run-locks: at most one run of each periodic job at a time, and every held lock visible.

A lock is three keys (names in ``redis_keys``), written together by one Lua script. Two
hold the lock's *entry*: the JSON object ``collect_run_locks`` answers for it, written once
at acquire, with two fields holding what they are computed from at read time --
``elapsedMs`` holds startedAt ms, ``overBudget`` holds startedAt + budget ms.

Every time here is Redis's (SPEC 4.9): the acquire script reads ``TIME`` and writes the
start itself, the TTLs are ``PX``/``PEXPIRE`` that Redis counts, and every read answers
Redis's now beside the entries, so no caller's clock -- the acquirer's or the reader's --
moves a lock's start, its elapsed time or its over-budget flag:

- ``lock:{job}``: a hash (``token``, ``entry``) living budget + grace (``extend`` sets the
  TTL again). Acquire, extend and release compare the token inside one script, so a
  holder whose lock expired can never extend or release the next holder's lock.
- ``lock:{job}:beat``: the entry, living ``lock_holder_dead_after_ms`` (never longer than
  the lock) and set again on every beat: gone means the holder is dead.
- the job in the registry zset ``locks:index`` (score startedAt ms). A release leaves it
  there, so a release is two commands, as cheap as a plain Redis lock's; the next walk
  drops every job whose lock is gone -- released, expired or broken.

``collect_run_locks`` is one script, one round trip at any number of locks:
``SORT locks:index BY nosort GET lock:*:beat`` looks every beat up in C, oldest first, and
the entries come back as JSON text in a few pieces (a lock whose beat is gone costs one
``HGET`` more), after Redis's now. The client parses it with ``json.loads`` and turns the
two fields into ``elapsedMs`` and ``overBudget`` at that now: redis-py's pure-Python reader is
slow on a long array reply and Lua 5.1 slow at string work, so neither works per lock.

A lock whose heartbeat is gone belongs to a dead holder; self-heal breaks it
(``break_dead_locks``: the same walk, the check and the delete in one script). A lock that
is over budget but still beating is reported (``overBudget``), never broken.

The scripts build the beat key, and the walk the lock keys (SORT's GET pattern), from the
names they are given; that is fine on one Redis server (the SPEC's deployment), not on
Redis Cluster. The prefix must not hold a ``*`` (SORT would put the job there), and an ACL
user limited to key patterns may not run SORT with GET patterns (Redis 7). A lock key
deleted by hand stays listed until its beat lapses (``lock_holder_dead_after_ms``) -- it
is free to acquire at once.

The scripts run on one connection of the client's pool that each context keeps
(``app.storage.redis_scripts``): redis-py 8's ``execute_command`` costs more than the lock cycle's
own work.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

from app.errors import AutonomyError
from app.storage.context import Context
from app.storage.redis_conn import redis_errors
from app.storage.redis_scripts import NOW_MS, Script, run_script, time_ms


class AlreadyRunning(AutonomyError):
    """Raised when a job's run-lock is held by another run."""

    code = "already_running"
    http_status = 409

    def __init__(self, job: str, holder: str | None, elapsed_ms: int | None) -> None:
        super().__init__(f"{job} is already running (held by {holder}, {elapsed_ms} ms)",
                         job=job, holder=holder, elapsedMs=elapsed_ms)
        self.job, self.holder, self.elapsed_ms = job, holder, elapsed_ms


# The beat key of a lock is always KEYS[1] .. ':beat' (see Keys.lock_beat): the scripts
# build it rather than take it as one more argument.

# ``iso(ms)``: epoch ms -> "YYYY-MM-DDTHH:MM:SS[.fff000]Z", as ``app.clock.iso`` writes it
# (days -> civil date: H. Hinnant's ``civil_from_days``). Lua has no date library in Redis.
_ISO = """
local function iso(ms)
  local s = math.floor(ms / 1000)
  local frac, days = ms - s * 1000, math.floor(s / 86400)
  local sod = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  local out = string.format('%04d-%02d-%02dT%02d:%02d:%02d', y, m, d,
    math.floor(sod / 3600), math.floor(sod % 3600 / 60), sod % 60)
  if frac > 0 then out = out .. string.format('.%03d000', frac) end
  return out .. 'Z'
end
"""

# KEYS[1] lock, KEYS[2] registry
# ARGV[1] token, ARGV[2] the entry's head (job and holder, up to startedAt's opening
# quote), ARGV[3] budget ms, ARGV[4] lock ttl ms, ARGV[5] beat ttl ms, ARGV[6] job,
# ARGV[7] now ('': Redis's clock)
# -> false acquired | {the holder's entry ('' if none), now ms} when held by another
# The run starts at Redis's now: its startedAt, its registry score and its over-budget
# instant are on the clock that counts its TTLs, whatever the acquirer's clock reads.
_ACQUIRE = Script(NOW_MS + _ISO + """
local now = now_ms(ARGV[7])
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {redis.call('HGET', KEYS[1], 'entry') or '', now}
end
local entry = ARGV[2] .. iso(now) .. '","elapsedMs":' .. string.format('%d', now) ..
  ',"budgetMs":' .. ARGV[3] .. ',"overBudget":' ..
  string.format('%d', now + tonumber(ARGV[3])) .. ',"holderAlive":true}'
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'entry', entry)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[1] .. ':beat', entry, 'PX', ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[6])
return false
""")

# KEYS[1] lock; ARGV[1] token, ARGV[2] budget ms ('' keeps it), ARGV[3] grace ms,
# ARGV[4] beat ttl ms
# -> 1 extended | 0 not the holder (or the lock is gone). The TTL is *set* to budget + grace;
#    the beat is set again (it may have lapsed), never to outlive the lock.
# The patterns cannot match inside the job or holder: JSON escapes a quote in a string.
_EXTEND = Script("""
local h = redis.call('HMGET', KEYS[1], 'token', 'entry')
if h[1] ~= ARGV[1] or not h[2] then return 0 end
local entry = h[2]
if ARGV[2] ~= '' then
  local started = tonumber(string.match(entry, '"elapsedMs":(%-?%d+)'))
  entry = string.gsub(entry, '"budgetMs":%-?%d+,"overBudget":%-?%d+',
    '"budgetMs":' .. ARGV[2] .. ',"overBudget":' ..
    string.format('%d', started + tonumber(ARGV[2])), 1)
  redis.call('HSET', KEYS[1], 'entry', entry)
end
local ttl = tonumber(string.match(entry, '"budgetMs":(%-?%d+)')) + tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[1] .. ':beat', entry, 'PX', math.min(ttl, tonumber(ARGV[4])))
return 1
""")

# KEYS[1] lock; ARGV[1] token -> 1 released | 0 not the holder (nothing done)
_RELEASE = Script("""
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[1] .. ':beat')
return 1
""")

# KEYS[1] registry; ARGV[1] key prefix, ARGV[2] '1' = break: release the locks whose
# holder stopped beating, and list only those; ARGV[3] now ('': Redis's clock)
# -> {now ms, pieces of JSON text...}: the pieces joined by ',' in brackets are the array
#    of entries (held locks, or the ones this call broke), oldest first. A lock with no
#    beat is listed from its lock key with holderAlive false; a job whose lock is gone
#    leaves the registry. The registry's members are read only then (ZRANGE: the order
#    SORT BY nosort walked).
# Pieces of 32 entries (a few KB) because Lua 5.1 builds one big string far slower.
_WALK = Script(NOW_MS + """
local now = now_ms(ARGV[3])
local beats = redis.call('SORT', KEYS[1], 'BY', 'nosort', 'GET', ARGV[1] .. 'lock:*:beat')
local breaking = ARGV[2] == '1'
local out, n = beats, #beats
local all_beating = true
for i = 1, n do
  if not beats[i] then all_beating = false; break end
end
if breaking or not all_beating then
  local jobs = redis.call('ZRANGE', KEYS[1], 0, -1)
  out, n = {}, 0
  for i = 1, #beats do
    if beats[i] then
      if not breaking then n = n + 1; out[n] = beats[i] end
    else
      local k = ARGV[1] .. 'lock:' .. jobs[i]
      local entry = redis.call('HGET', k, 'entry')
      if entry then
        n = n + 1
        out[n] = string.sub(entry, 1, -6) .. 'false}'
        if breaking then redis.call('DEL', k) end
      end
      if breaking or not entry then redis.call('ZREM', KEYS[1], jobs[i]) end
    end
  end
end
local pieces = {now}
for i = 1, n, 32 do pieces[#pieces + 1] = table.concat(out, ',', i, math.min(i + 31, n)) end
return pieces
""")


# KEYS[1] lock, KEYS[2] registry; ARGV[1] job, ARGV[2] now ('': Redis's clock)
# -> {the entry of the lock this call broke (its holder stopped beating), now ms}, or false
#    when the lock is free or its holder still beats (nothing done)
_BREAK_IF_DEAD = Script(NOW_MS + """
if redis.call('EXISTS', KEYS[1] .. ':beat') == 1 then return false end
local entry = redis.call('HGET', KEYS[1], 'entry')
if not entry then return false end
local now = now_ms(ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {string.sub(entry, 1, -6) .. 'false}', now}
""")


class RunLockLost(AutonomyError):
    """Raised when a run's write is fenced: its run-lock was broken, expired or taken over
    (SPEC 4.7), so what it was about to write is refused."""

    code = "run_lock_lost"
    http_status = 409

    def __init__(self, job: str, what: str) -> None:
        super().__init__(f"{job}: the run-lock was lost before {what} could be written; "
                         "refused", job=job, refused=what)
        self.job, self.what = job, what


def _lock_key(ctx: Context, job: str) -> str:
    """``job``'s lock key, built once per context (a lock cycle names it twice)."""
    cache: dict[str, str] = ctx.__dict__.setdefault("_lock_keys", {})
    key = cache.get(job)
    if key is None:
        key = cache[job] = ctx.keys.lock(job)
    return key


def _registry(ctx: Context) -> str:
    key: str | None = ctx.__dict__.get("_lock_registry")
    if key is None:
        key = ctx.__dict__["_lock_registry"] = ctx.keys.lock_registry()
    return key


@lru_cache(maxsize=1024)
def _head(job: str, holder: str) -> str:
    """The entry's head as the acquire script completes it (``_ACQUIRE``)."""
    return f'{{"job":{json.dumps(job)},"holder":{json.dumps(holder)},"startedAt":"'


def _as_read(entries: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """Stored entries -> answered ones: elapsed and over-budget at ``now_ms``."""
    for e in entries:
        elapsed = now_ms - e["elapsedMs"]
        e["elapsedMs"] = elapsed if elapsed > 0 else 0
        e["overBudget"] = now_ms > e["overBudget"]
    return entries


def _held_by(entry: str, now_ms: int) -> tuple[str | None, int | None]:
    """(holder, elapsed ms at Redis's ``now_ms``) of a stored entry; (None, None) for none
    (a lock written by another version)."""
    if not entry:
        return None, None
    e = json.loads(entry)
    return e["holder"], max(0, now_ms - e["elapsedMs"])


def default_holder(task_id: str | None = None) -> str:
    """``host:pid:task`` -- who holds a lock, readable in the status payload."""
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or 'inline'}"


def acquire(ctx: Context, job: str, *, budget_ms: int, holder: str | None = None) -> str | None:
    """Take ``job``'s run-lock for ``budget_ms``; answers its token, or None when held.

    Raises ``RedisUnavailable`` when Redis cannot be reached.
    """
    return _acquire(ctx, job, budget_ms=budget_ms, holder=holder or default_holder())[0]


def _acquire(ctx: Context, job: str, *, budget_ms: int, holder: str, token: str | None = None
             ) -> tuple[str | None, tuple[str, int]]:
    """(token, ("", 0)) when taken, else (None, (the holder's entry, Redis's now ms))."""
    budget = int(budget_ms)
    s = ctx.settings
    lock_ttl = budget + s.lock_grace_ms
    token = token or os.urandom(16).hex()
    other = run_script(ctx, _ACQUIRE, 2, _lock_key(ctx, job), _registry(ctx), token,
                       _head(job, holder), budget, lock_ttl,
                       min(s.lock_holder_dead_after_ms, lock_ttl), job, ctx.redis_now_arg())
    if other is None:
        return token, ("", 0)
    return None, (other[0], int(other[1]))


def holder_of(ctx: Context, job: str) -> dict[str, Any] | None:
    """The current holder of ``job``'s lock (``holder``, ``elapsedMs``), or None."""
    with redis_errors(ctx.redis):  # one round trip: the entry, and Redis's clock
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.hget(_lock_key(ctx, job), "entry")
        pipe.time()
        entry, reply = pipe.execute()
    if entry is None:
        return None
    now_ms = time_ms(ctx, reply)
    holder, elapsed_ms = _held_by(cast(str, entry), now_ms)  # the client decodes replies
    return {"holder": holder, "elapsedMs": elapsed_ms}


def holds(ctx: Context, job: str, token: str) -> bool:
    """Does ``token`` hold ``job``'s lock now? (The fence of a run's writes, asked inside
    the write's transaction: on the fast path's client, so a stalled Redis holds that
    transaction for ``redis_fast_path_timeout_ms`` at most.) Raises ``RedisUnavailable``
    when Redis cannot answer in time."""
    with redis_errors(ctx.fast_redis):
        return bool(ctx.fast_redis.hget(_lock_key(ctx, job), "token") == token)


def extend(ctx: Context, job: str, token: str, *, budget_ms: int | None = None) -> bool:
    """Set the lock's TTL (budget + grace) and its heartbeat again, optionally with a new
    budget; False if ``token`` no longer holds it (nothing done)."""
    s = ctx.settings
    ok = run_script(ctx, _EXTEND, 1, _lock_key(ctx, job), token,
               "" if budget_ms is None else int(budget_ms), s.lock_grace_ms,
               s.lock_holder_dead_after_ms)
    return bool(ok)


def beat(ctx: Context, job: str, token: str) -> bool:
    """The holder's heartbeat: keeps the lock alive; False if it is no longer ours."""
    return extend(ctx, job, token)


def keep(ctx: Context, job: str, token: str, *, budget_ms: int, holder: str) -> str:
    """The heartbeat of a lock held for a process's life (the beat leader's): ``"held"``
    when extended; ``"retaken"`` when its key had vanished (Redis restarted empty, or it
    lapsed in an outage) and this holder took it again with the same token; ``"lost"`` only
    when another holder has it. Raises ``RedisUnavailable`` when Redis cannot be reached.
    """
    if extend(ctx, job, token):
        return "held"
    got, _ = _acquire(ctx, job, budget_ms=budget_ms, holder=holder, token=token)
    return "retaken" if got else "lost"


def release(ctx: Context, job: str, token: str) -> bool:
    """Release ``job``'s lock if ``token`` still holds it; False otherwise (nothing done)."""
    return run_script(ctx, _RELEASE, 1, _lock_key(ctx, job), token) == 1


def _walk(ctx: Context, *, breaking: bool) -> list[dict[str, Any]]:
    now_ms, *pieces = run_script(ctx, _WALK, 1, _registry(ctx), ctx.settings.redis_prefix,
                                 "1" if breaking else "0", ctx.redis_now_arg())
    return _as_read(json.loads(f"[{','.join(pieces)}]"), int(now_ms))


def collect_run_locks(ctx: Context) -> list[dict[str, Any]]:
    """Every held run-lock, oldest first, in one round trip: ``job``, ``holder``,
    ``startedAt``, ``elapsedMs``, ``budgetMs``, ``overBudget``, ``holderAlive``."""
    return _walk(ctx, breaking=False)


def break_dead_locks(ctx: Context) -> list[dict[str, Any]]:
    """Release every lock whose holder stopped beating; answers the ones released (as
    ``collect_run_locks`` lists them), in one round trip.

    The check and the delete are one Lua step, so a lock taken again in between, or whose
    holder beats again, is left alone.
    """
    return _walk(ctx, breaking=True)


def break_if_dead(ctx: Context, job: str) -> dict[str, Any] | None:
    """Release ``job``'s lock only if its holder stopped beating; answers the lock released
    (as ``collect_run_locks`` lists it), or None when it is free or its holder is alive.
    The check and the delete are one Lua step."""
    got = run_script(ctx, _BREAK_IF_DEAD, 2, _lock_key(ctx, job), _registry(ctx), job,
                     ctx.redis_now_arg())
    return None if got is None else _as_read([json.loads(got[0])], int(got[1]))[0]


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
    token, other = _acquire(ctx, job, budget_ms=budget_ms, holder=who)
    if token is None:
        raise AlreadyRunning(job, *_held_by(*other))
    h = Held(job=job, token=token, holder=who)
    beater = threading.Thread(target=_beat_until_stopped, args=(ctx, h),
                              name=f"run-lock-{job}", daemon=True)
    beater.start()
    try:
        yield h
    finally:
        h._stop.set()
        beater.join()
        # best effort: the run has answered; a lock Redis refuses to release now
        # expires within its TTL (budget + grace) and never turns the run into an error
        with contextlib.suppress(AutonomyError):
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
