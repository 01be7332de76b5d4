"""Claim-lease dedupe in Redis: the fast path that answers a duplicate claim without a
database write.

Redis here is a cache of the database's leases and lane state, never the authority:
every refusal it suggests is confirmed by a database read before it is answered, and a
flushed Redis only means the database layer does all the work. Every call here goes
through ``_fast``: the fast path's client (``redis_fast_path_timeout_ms``, no retries) and
the context's ``RedisHealth`` -- a Redis that errs or stalls marks it degraded, and until
a re-probe answers, the operations skip Redis and the database answers alone (SPEC 4.7). Keys: see
``app/storage/redis_keys.py`` (``lease:*``, ``lane:*:leases``, ``lane:*:meta``, ``lane:*:guards``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.storage.context import Context
from app.storage.redis_errors import ANY_REDIS_ERROR, describe, is_unavailable
from app.storage.redis_scripts import NOW_MS, Script, run_script

log = logging.getLogger(__name__)

PROCEED, PAUSED, WORKER_HOLDS, LANE_FULL, CLAIMING = 0, 1, 2, 3, 4

# A claim that may go ahead reserves its slot in the lane's zset (member ``claim:{worker}``,
# score = when the reservation lapses) in the same step, so that a claim racing it is told
# to wait (CLAIMING) instead of both going on to the database: the Redis layer on its own
# keeps a lane within its ``maxInFlight``. ``record`` turns the reservation into the lease;
# ``unreserve`` drops it when the claim granted nothing; a crashed claimer's lapses.
#
# Every score in the zset -- a reservation's lapse, a lease's expiry -- is on Redis's clock
# (``NOW_MS``: ``TIME`` inside the script), and so is the ``now`` that drops the lapsed
# ones: a claimer whose clock is off neither wipes the lane's live leases and
# reservations (ahead) nor reserves a slot that has already lapsed (behind) (SPEC 4.9).
#
# KEYS[1] lane meta hash, KEYS[2] this worker's lease key, KEYS[3] lane leases zset
# (the check's body reads ``now``, ``worker`` and ``lapse``: when the reservation lapses)
# -> {PAUSED, reason, pausedAt} | {WORKER_HOLDS, leaseJSON} | {LANE_FULL, id...}
#    | {CLAIMING, worker} (a claim in flight holds the slot) | {PROCEED} (slot reserved)
_CHECK_BODY = """
local meta = redis.call('HMGET', KEYS[1], 'paused', 'reason', 'pausedAt', 'maxInFlight')
if meta[1] == '1' then return {1, meta[2] or '', meta[3] or ''} end
local mine = redis.call('GET', KEYS[2])
if mine then return {2, mine} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local me = 'claim:' .. worker
if redis.call('ZSCORE', KEYS[3], me) then return {4, worker} end
local limit = tonumber(meta[4])
if limit then
  local live = redis.call('ZRANGE', KEYS[3], 0, -1)
  if #live >= limit then
    local out, claiming = {3}, nil
    for i, id in ipairs(live) do
      if string.sub(id, 1, 6) == 'claim:' then claiming = string.sub(id, 7)
      else out[#out + 1] = id end
    end
    if #out - 1 < limit and claiming then return {4, claiming} end
    return out
  end
end
redis.call('ZADD', KEYS[3], lapse, me)
return {0}
"""
# ARGV[1] worker, ARGV[2] how long the reservation holds (ms), ARGV[3] now ('': Redis's)
_CHECK = Script(NOW_MS + """
local now = now_ms(ARGV[3])
local worker, lapse = ARGV[1], now + tonumber(ARGV[2])
""" + _CHECK_BODY)

# A worker's completed lease handed straight to its next claim: ``_DROP`` for the lease
# that ended (ARGV[1] its token, ARGV[2] its task id), then ``_CHECK`` for the claim
# (ARGV[3] worker, ARGV[4] reservation ms, ARGV[5] now) -- one round trip instead of two.
_HANDOFF = Script(NOW_MS + """
local now = now_ms(ARGV[5])
local worker, lapse = ARGV[3], now + tonumber(ARGV[4])
local cur = redis.call('GET', KEYS[2])
if cur and string.find(cur, ARGV[1], 1, true) then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[2])
""" + _CHECK_BODY)

# KEYS[1] lane leases zset; ARGV[1] worker
_UNRESERVE = Script("""
return redis.call('ZREM', KEYS[1], 'claim:' .. ARGV[1])
""")

# KEYS[1] worker lease key, KEYS[2] lane leases zset, KEYS[3] lane meta hash, KEYS[4] metrics,
# KEYS[5] clock skew hash
# ARGV[1] lease JSON, ARGV[2] ttl ms (the lease's time left, as the database granted it),
# ARGV[3] task id, ARGV[4] now ('': Redis's), ARGV[5] max in flight, ARGV[6] metric field
# to bump ('' for none), ARGV[7] worker, ARGV[8] the worker's clock skew report JSON ('' for
# none), ARGV[9] its key's TTL ms
# The lease's zset score is its expiry on Redis's clock: now + ttl.
_RECORD = Script(NOW_MS + """
local now = now_ms(ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], 'claim:' .. ARGV[7])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], 'maxInFlight', ARGV[5])
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[6], 1) end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[7], ARGV[8])
  redis.call('PEXPIRE', KEYS[5], ARGV[9])
end
return 1
""")

SKEW_TTL_MS = 86_400_000  # a worker that stopped reporting a day ago is forgotten

# KEYS[1] worker lease key, KEYS[2] lane leases zset
# ARGV[1] token, ARGV[2] task id
# Deletes the worker key only when it still carries this token (never another's lease).
_DROP = Script("""
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, ARGV[1], 1, true) then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
""")

# KEYS[1] lane guards list, KEYS[2] metrics hash
# ARGV[1] guard JSON, ARGV[2] list cap, ARGV[3] metric field
_GUARD = Script("""
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
""")


@dataclass(frozen=True)
class FastPath:
    """What Redis suggests before the database is asked."""

    code: int
    reason: str | None = None
    paused_at: str | None = None
    lease: dict[str, Any] | None = None
    task_ids: tuple[int, ...] = ()
    claiming: str | None = None


def _run(ctx: Context, script: Script, keys: list[str], args: list[Any]) -> Any:
    return run_script(ctx, script, len(keys), *keys, *args, fast=True)


_SKIPPED = object()


def _fast(ctx: Context, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the fast path, or ``_SKIPPED`` when Redis is degraded or fails now (the
    caller goes on with the database alone). A failure that means Redis is unavailable
    (``app.storage.redis_errors``: down, stalled, ``OOM``, ``READONLY``, ``NOAUTH``, ...)
    marks it degraded; any other Redis error is logged and skipped all the same -- the
    database is the decision, so nothing Redis says here can turn an answer into an
    error, before the commit or after it (SPEC 4.7)."""
    health = ctx.redis_health
    if not health.usable():
        return _SKIPPED
    try:
        out = fn()
    except ANY_REDIS_ERROR as e:
        if is_unavailable(e):
            health.failed(e)
            log.debug("redis: could not %s (the database stays authoritative): %s", what,
                      describe(e))
        else:
            log.warning("redis: could not %s (the database stays authoritative): %r %s",
                        what, type(e).__name__, describe(e))
        return _SKIPPED
    health.ok()
    return out


# A script call as the fast path sends it: the script, its KEYS and its ARGV. Built in one
# place per script (``*_call``), so a caller that sends the same scripts itself (the floor
# of ``bench/b3_claim_complete.py``) cannot fall out of step when an ARGV changes.
Call = tuple[Script, list[str], list[Any]]


def check_call(ctx: Context, *, assignee: str, worker: str) -> Call:
    """``check``'s script call."""
    k = ctx.keys
    return (_CHECK,
            [k.lane_meta(assignee), k.worker_lease(assignee, worker), k.lane_leases(assignee)],
            [worker, ctx.settings.claim_reserve_ms, ctx.redis_now_arg()])


def check(ctx: Context, *, assignee: str, worker: str) -> FastPath | None:
    """One round trip: is the lane paused, does the worker hold a lease, is the lane full,
    is another claim in flight? When none of these, the worker's slot is reserved for
    ``claim_reserve_ms`` (``PROCEED``), on Redis's clock.

    None when Redis is degraded or cannot answer within its deadline: the database decides
    alone.
    """
    call = check_call(ctx, assignee=assignee, worker=worker)
    res = _fast(ctx, "check the claim", lambda: _run(ctx, *call))
    return None if res is _SKIPPED else _fast_path(res)


def handoff(ctx: Context, *, assignee: str, worker: str, task_id: int, token: str
            ) -> FastPath | None:
    """``drop`` the worker's lease on ``task_id`` (it is being completed) and ``check``
    its next claim, in one round trip. None when Redis is degraded."""
    k = ctx.keys
    res = _fast(ctx, "hand the lease over", lambda: _run(
        ctx, _HANDOFF,
        [k.lane_meta(assignee), k.worker_lease(assignee, worker), k.lane_leases(assignee)],
        [token, task_id, worker, ctx.settings.claim_reserve_ms, ctx.redis_now_arg()]))
    return None if res is _SKIPPED else _fast_path(res)


def _fast_path(res: Any) -> FastPath:
    code = int(res[0])
    if code == CLAIMING:
        return FastPath(CLAIMING, claiming=res[1])
    if code == PAUSED:
        return FastPath(PAUSED, reason=res[1] or None, paused_at=res[2] or None)
    if code == WORKER_HOLDS:
        return FastPath(WORKER_HOLDS, lease=json.loads(res[1]))
    if code == LANE_FULL:
        return FastPath(LANE_FULL, task_ids=tuple(int(x) for x in res[1:]))
    return FastPath(PROCEED)


def record_call(ctx: Context, *, assignee: str, worker: str, task_id: int, token: str,
                expires_ms: int, now_ms: int, max_in_flight: int, metric: str = "",
                skew_ms: int | None = None) -> Call:
    """``record``'s script call. ``expires_ms`` and ``now_ms`` are the database's (the
    lease as granted, and when): only their difference, the lease's time left, goes to
    Redis, which keeps the lease that long on its own clock."""
    k = ctx.keys
    ttl = max(1, expires_ms - now_ms)
    lease = json.dumps({"taskId": task_id, "token": token, "expiresAtMs": expires_ms})
    skew = "" if skew_ms is None else json.dumps({"skewMs": skew_ms, "atMs": now_ms})
    return (_RECORD,
            [k.worker_lease(assignee, worker), k.lane_leases(assignee), k.lane_meta(assignee),
             k.metrics(), k.clock_skew()],
            [lease, ttl, task_id, ctx.redis_now_arg(), max_in_flight, metric, worker, skew,
             SKEW_TTL_MS])


def record(ctx: Context, *, assignee: str, worker: str, task_id: int, token: str,
           expires_ms: int, now_ms: int, max_in_flight: int, metric: str = "",
           skew_ms: int | None = None) -> None:
    """Mirror a granted or extended lease into Redis (best effort: the DB already holds it),
    and, in the same script, the clock skew the worker reported (``skew_ms``; ``now_ms``
    is the database's time)."""
    call = record_call(ctx, assignee=assignee, worker=worker, task_id=task_id, token=token,
                       expires_ms=expires_ms, now_ms=now_ms, max_in_flight=max_in_flight,
                       metric=metric, skew_ms=skew_ms)
    _best_effort("record lease", lambda: _run(ctx, *call), ctx)


def clock_skews(ctx: Context) -> dict[str, dict[str, int]]:
    """Every worker's last clock skew report, ``{worker: {skewMs, atMs}}`` (unreadable
    entries left out). Raises ``RedisUnavailable`` (through ``redis_errors``) when Redis
    cannot answer: the caller says so."""
    out: dict[str, dict[str, int]] = {}
    for name, raw in ctx.redis.hgetall(ctx.keys.clock_skew()).items():
        try:
            got = json.loads(raw)
            out[name.decode() if isinstance(name, bytes) else str(name)] = {
                "skewMs": int(got["skewMs"]), "atMs": int(got["atMs"])}
        except (ValueError, KeyError, TypeError):
            continue
    return out


def unreserve(ctx: Context, *, assignee: str, worker: str) -> None:
    """Give back the slot ``check`` reserved, when the claim granted nothing (best effort:
    an unreleased reservation lapses after ``claim_reserve_ms``)."""
    _best_effort(
        "drop claim reservation",
        lambda: _run(ctx, _UNRESERVE, [ctx.keys.lane_leases(assignee)], [worker]),
        ctx,
    )


def drop_call(ctx: Context, *, assignee: str, worker: str | None, task_id: int,
              token: str | None) -> Call:
    """``drop``'s script call."""
    k = ctx.keys
    worker_key = k.worker_lease(assignee, worker) if worker else k.worker_lease(assignee, "")
    return _DROP, [worker_key, k.lane_leases(assignee)], [token or "\x00", task_id]


def drop(ctx: Context, *, assignee: str, worker: str | None, task_id: int,
         token: str | None) -> None:
    """Forget a lease that ended (completed, failed, requeued, released)."""
    call = drop_call(ctx, assignee=assignee, worker=worker, task_id=task_id, token=token)
    _best_effort("drop lease", lambda: _run(ctx, *call), ctx)


def set_paused(ctx: Context, *, assignee: str, paused: bool, reason: str | None,
               paused_at: str | None) -> None:
    """Mirror the lane's pause state (the DB confirms it before any refusal)."""
    key = ctx.keys.lane_meta(assignee)

    def write() -> None:
        if paused:
            ctx.fast_redis.hset(key, mapping={"paused": "1", "reason": reason or "",
                                              "pausedAt": paused_at or ""})
        else:
            pipe = ctx.fast_redis.pipeline()
            pipe.hset(key, "paused", "0")
            pipe.hdel(key, "reason", "pausedAt")
            pipe.execute()

    _best_effort("mirror pause", write, ctx)


def set_max_in_flight(ctx: Context, *, assignee: str, max_in_flight: int) -> None:
    _best_effort(
        "mirror max in flight",
        lambda: ctx.fast_redis.hset(ctx.keys.lane_meta(assignee), "maxInFlight",
                                    max_in_flight),
        ctx,
    )


def log_guard(ctx: Context, *, assignee: str, entry: dict[str, Any], metric: str) -> None:
    """Append a refused duplicate to the lane's capped guard log (kept off the database)."""
    k = ctx.keys
    _best_effort(
        "log guard",
        lambda: _run(ctx, _GUARD, [k.lane_guards(assignee), k.metrics()],
                     [json.dumps(entry), ctx.settings.guard_log_max, metric]),
        ctx,
    )


def guard_log(ctx: Context, *, assignee: str, limit: int = 200) -> list[dict[str, Any]]:
    """The lane's most recent refused duplicates, newest first (none while Redis is
    degraded)."""
    raw = _fast(ctx, "read the guard log",
                lambda: ctx.fast_redis.lrange(ctx.keys.lane_guards(assignee), 0, limit - 1))
    if raw is _SKIPPED:
        return []
    out = []
    for item in raw:
        try:
            out.append(json.loads(item))
        except ValueError:
            continue
    return out


def bump(ctx: Context, metric: str, by: int = 1) -> None:
    """Increment a counter in the metrics hash (best effort)."""
    _best_effort("bump metric",
                 lambda: ctx.fast_redis.hincrby(ctx.keys.metrics(), metric, by), ctx)


def _best_effort(what: str, fn: Any, ctx: Context) -> None:
    _fast(ctx, what, fn)


PROBE_TTL_MS = 60_000


def write_probe(ctx: Context) -> None:
    """One small write on the fast path's client, raising what Redis raised: a Redis
    that answers PING but refuses writes (full under ``noeviction``, a read-only
    replica, ``MISCONF``) cannot serve the fleet either."""
    ctx.fast_redis.set(ctx.keys.probe(), "1", px=PROBE_TTL_MS)


def probe(ctx: Context) -> bool:
    """Is Redis usable now, as the fast path sees it (a write within its deadline, unless
    a re-probe is not due yet)? For the status payload's ``redis`` field. A probe that
    misses its deadline is asked again while Redis is not yet degraded (one late answer
    from a busy Redis is not an outage; a stalled one is degraded after
    ``redis_degraded_after_misses`` deadlines)."""
    for _ in range(ctx.settings.redis_degraded_after_misses):
        if _fast(ctx, "probe", lambda: write_probe(ctx)) is not _SKIPPED:
            return True
        if ctx.redis_health.degraded:
            return False
    return False


# --- batched leases (a worker's prefetch, issue 22) -----------------------------------

# One worker's leases in one lane recorded at once (``record`` for each, in one script),
# on Redis's own clock as ``_RECORD`` is: only each lease's time left comes from the caller.
# KEYS[1] worker lease key, KEYS[2] lane leases zset, KEYS[3] lane meta hash, KEYS[4]
# metrics, KEYS[5] clock skew hash
# ARGV[1] the last lease's JSON (the worker key keeps it), ARGV[2] the longest time left
# (ms), ARGV[3] now (``NOW_MS``: '' = Redis's TIME), ARGV[4] max in flight, ARGV[5] metric
# field ('' for none), ARGV[6] worker, ARGV[7] skew report JSON ('' for none), ARGV[8]
# its key's TTL ms, ARGV[9..] task id, its time left (ms), ...
_RECORD_MANY = Script(NOW_MS + """
local now = now_ms(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], 'claim:' .. ARGV[6])
for i = 9, #ARGV, 2 do redis.call('ZADD', KEYS[2], now + tonumber(ARGV[i + 1]), ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], 'maxInFlight', ARGV[4])
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[5], (#ARGV - 8) / 2) end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[6], ARGV[7])
  redis.call('PEXPIRE', KEYS[5], ARGV[8])
end
return 1
""")

# One worker's ended leases in one lane dropped at once (``_DROP`` for each).
# KEYS[1] worker lease key, KEYS[2] lane leases zset
# ARGV[1] n, ARGV[2..n+1] tokens, ARGV[n+2..2n+1] their task ids
_DROP_MANY = Script("""
local n = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
for i = 2, n + 1 do
  if cur and string.find(cur, ARGV[i], 1, true) then
    redis.call('DEL', KEYS[1])
    cur = nil
  end
  redis.call('ZREM', KEYS[2], ARGV[i + n])
end
return 1
""")


def _pipelined(ctx: Context, calls: list[Call]) -> None:
    """Every ``(script, keys, args)`` in one round trip (``EVALSHA`` pipelined; a Redis
    that forgot a script is sent them and the calls once more)."""
    from redis.exceptions import NoScriptError

    def send(load: bool) -> list[Any]:
        pipe = ctx.fast_redis.pipeline(transaction=False)
        if load:
            for script in {c[0].sha: c[0] for c in calls}.values():
                pipe.script_load(script.body)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))

    out = send(False)
    if any(isinstance(r, NoScriptError) for r in out):
        out = send(True)
    for r in out:
        if isinstance(r, Exception):
            raise r


def drops(ctx: Context, ended: list[tuple[str, str | None, int, str | None]]) -> list[Call]:
    """The calls that forget ended leases, ``(assignee, worker, task id, token)`` each:
    one script per worker and lane."""
    k = ctx.keys
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for a, w, tid, token in ended:
        groups.setdefault((a, w or ""), []).append((tid, token or "\x00"))
    return [(_DROP_MANY, [k.worker_lease(a, w), k.lane_leases(a)],
             [len(xs), *(t for _, t in xs), *(tid for tid, _ in xs)])
            for (a, w), xs in groups.items()]


def records(ctx: Context, *, assignee: str, worker: str, granted: list[tuple[int, str, int]],
            now_ms: int, max_in_flight: int, metric: str = "",
            skew_ms: int | None = None) -> list[Call]:
    """The call that mirrors one worker's granted leases, ``(task id, token, expires ms)``
    each, ``now_ms`` the database's time they were granted at: only their time left goes to
    Redis, which keeps each that long on its own clock (the worker key keeps the last one:
    a suggestion the database confirms; the lane's zset holds them all)."""
    if not granted:
        return []
    k = ctx.keys
    tid, token, expires_ms = granted[-1]
    lease = json.dumps({"taskId": tid, "token": token, "expiresAtMs": expires_ms})
    skew = "" if skew_ms is None else json.dumps({"skewMs": skew_ms, "atMs": now_ms})
    left = [(t, max(1, e - now_ms)) for t, _, e in granted]  # the database's times
    pairs = [x for t, ms in left for x in (t, ms)]
    return [(_RECORD_MANY, [k.worker_lease(assignee, worker), k.lane_leases(assignee),
                            k.lane_meta(assignee), k.metrics(), k.clock_skew()],
             [lease, max(ms for _, ms in left), ctx.redis_now_arg(), max_in_flight, metric,
              worker, skew, SKEW_TTL_MS, *pairs])]


def sync(ctx: Context, calls: list[Call]) -> None:
    """Send ``drops`` and ``records`` calls in one round trip (best effort: the database
    holds the leases; Redis is its cache)."""
    if calls:
        _best_effort("mirror leases", lambda: _pipelined(ctx, calls), ctx)
