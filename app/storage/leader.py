"""The beat leader lease: which Celery beat sends the schedule, and which ones stand by.

A lease, not a run-lock: it has no budget (a leader leads for as long as it lives), only a
TTL (``beat_lease_ttl_ms``) that the leader renews every ``beat_lease_renew_ms``. A leader
that dies stops renewing; its lease lapses within the TTL and a standby takes it.

- ``beat:leader`` (hash ``token``, ``holder``, ``since`` ms, ``renewedAt`` ms): written by
  ``acquire`` only when absent, renewed (TTL *set* again) and released only by the token
  that took it, each in one script.
- ``beat:standbys`` (zset, member holder, score the ms it last said it stands by): each
  standby adds itself on every poll; entries older than the TTL are dropped when read.

``view`` is the status payload's ``beat`` object; ``heartbeat_of`` is the beat probe's
question: has this holder (leader or standby) been heard from within the TTL?

One clock (SPEC 4.9): the lease lapses by its ``PEXPIRE`` TTL, which Redis counts; its
``since``/``renewedAt`` and every standby's score are Redis's ``TIME`` (read inside the
scripts), and a read compares them with Redis's now (``TIME`` in the same round trip). A
beat whose clock is off neither drops the other standbys nor outlives its own TTL in the
list, and a probe whose clock is off neither misses a live beat nor sees a dead one.
"""

from __future__ import annotations

import os
from typing import Any

from app.clock import from_ms, iso
from app.storage.context import Context
from app.storage.redis_conn import redis_errors
from app.storage.redis_scripts import NOW_MS, Script, run_script, time_ms

# KEYS[1] leader, KEYS[2] standbys; ARGV[1] token, ARGV[2] holder, ARGV[3] now ('':
# Redis's clock), ARGV[4] ttl ms -> false taken | the current leader's holder when held by
# another
_ACQUIRE = Script(NOW_MS + """
local current = redis.call('HGET', KEYS[1], 'holder')
if current then return current end
local now = string.format('%d', now_ms(ARGV[3]))
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'holder', ARGV[2], 'since', now,
  'renewedAt', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[2])
return false
""")

# KEYS[1] leader; ARGV[1] token, ARGV[2] now ('': Redis's clock), ARGV[3] ttl ms
# -> 1 renewed | 0 the lease is gone | -1 another holder has it
_RENEW = Script(NOW_MS + """
local token = redis.call('HGET', KEYS[1], 'token')
if not token then return 0 end
if token ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'renewedAt', string.format('%d', now_ms(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")

# KEYS[1] leader; ARGV[1] token -> 1 released | 0 not the holder
_RELEASE = Script("""
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
""")

# KEYS[1] standbys; ARGV[1] holder, ARGV[2] now ('': Redis's clock), ARGV[3] ttl ms
# The holder's score is Redis's now; entries older than the TTL (on that clock) go.
_STAND_BY = Script(NOW_MS + """
local now = now_ms(ARGV[2])
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
""")

RENEWED, GONE, TAKEN = 1, 0, -1


def acquire(ctx: Context, holder: str, *, token: str | None = None
            ) -> tuple[str | None, str | None]:
    """Take the lease if nobody holds it: (token, None), else (None, the leader). A leader
    whose lease vanished (Redis restarted) takes it again with its own ``token``."""
    token = token or os.urandom(16).hex()
    k = ctx.keys
    other = run_script(ctx, _ACQUIRE, 2, k.beat_leader(), k.beat_standbys(), token, holder,
                       ctx.redis_now_arg(), ctx.settings.beat_lease_ttl_ms)
    if other is None:
        return token, None
    return None, str(other)


def renew(ctx: Context, token: str) -> int:
    """Renew the lease held by ``token``: ``RENEWED``, ``GONE`` or ``TAKEN``."""
    return int(run_script(ctx, _RENEW, 1, ctx.keys.beat_leader(), token,
                          ctx.redis_now_arg(), ctx.settings.beat_lease_ttl_ms))


def release(ctx: Context, token: str) -> bool:
    """Give the lease up (only by the token that holds it)."""
    return bool(run_script(ctx, _RELEASE, 1, ctx.keys.beat_leader(), token))


def stand_by(ctx: Context, holder: str) -> None:
    """Say that ``holder`` is alive and standing by (seen by ``view`` for one TTL)."""
    run_script(ctx, _STAND_BY, 1, ctx.keys.beat_standbys(), holder, ctx.redis_now_arg(),
               ctx.settings.beat_lease_ttl_ms)


def _read(ctx: Context) -> tuple[dict[str, str], list[tuple[str, float]]]:
    """The lease and the standbys heard from within the TTL, by Redis's clock (one round
    trip: the lease, Redis's now and the standbys)."""
    ttl = ctx.settings.beat_lease_ttl_ms
    with redis_errors(ctx.redis):
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.hgetall(ctx.keys.beat_leader())
        pipe.time()
        pipe.zrange(ctx.keys.beat_standbys(), 0, -1, withscores=True)
        lease, reply, standbys = pipe.execute()
    now = time_ms(ctx, reply)
    return dict(lease), [(str(m), float(s)) for m, s in standbys if s >= now - ttl]


def view(ctx: Context) -> dict[str, Any]:
    """The status payload's ``beat``: leader, since, renewedAt, ttlMs, standbys."""
    lease, standbys = _read(ctx)
    leader = lease.get("holder")
    return {
        "leader": leader,
        "since": iso(from_ms(int(lease["since"]))) if "since" in lease else None,
        "renewedAt": iso(from_ms(int(lease["renewedAt"]))) if "renewedAt" in lease else None,
        "ttlMs": ctx.settings.beat_lease_ttl_ms,
        "standbys": sorted(m for m, _ in standbys if m != leader),
    }


def unknown(ctx: Context) -> dict[str, Any]:
    """The ``beat`` object while Redis cannot be read: nobody known to lead."""
    return {"leader": None, "since": None, "renewedAt": None,
            "ttlMs": ctx.settings.beat_lease_ttl_ms, "standbys": []}


def heartbeat_of(ctx: Context, holder_prefix: str) -> str | None:
    """``"leader"`` or ``"standby"`` when a beat whose holder starts with ``holder_prefix``
    leads or stood by within the lease TTL; None when none did."""
    lease, standbys = _read(ctx)
    if lease.get("holder", "").startswith(holder_prefix):
        return "leader"
    if any(m.startswith(holder_prefix) for m, _ in standbys):
        return "standby"
    return None
