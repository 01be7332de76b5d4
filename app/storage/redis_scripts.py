"""Lua scripts through redis-py's public API: the hot path of run-locks and claim leases.

``run_script(ctx, script, numkeys, *keys_and_args)`` sends ``EVALSHA`` (``EVAL`` once after
a Redis restart forgot the script) through the context's client, with its pool and retry
policy, and translates the errors that mean Redis is unavailable (``app.storage.
redis_errors``: down, stalled, ``OOM``, ``READONLY``, ...) into ``RedisUnavailable``.

Why the public API: an earlier runner kept one pool connection and drove redis-py's
connection internals to save ~25 us a call; a claim+complete cycle costs milliseconds, so
that saving was ~1 % of it (measured in ``docs/benchmarks.md``), not worth breaking on a
minor redis-py release. Measured again after issue 13 (2026-12-05, redis-py 8.2, the fast
path's client): ``evalsha`` 80 us of client CPU a call, ``send_command`` +
``read_response`` on a pool connection 62 us -- 36 us on a worker's ~1 ms of CPU per
task (2 calls), ~3 %: still not worth it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from app.storage.context import Context
from app.storage.redis_errors import CANDIDATES, is_unavailable, unavailable

# The time on the Redis side (SPEC 4.9): a script that needs "now" starts with this and
# calls ``now_ms(ARGV[n])``, given ``Context.redis_now_arg()`` -- Redis's own clock
# (``TIME``) in production, a test's pinned one otherwise. Every expiry Redis keeps is a
# ``PX``/``PEXPIRE`` TTL that Redis counts itself, and every time a script compares (a
# zset score, a lock's start) is on that same clock: a caller's clock never decides.
# ``TIME`` before a write in a script needs script effects replication: the default from
# Redis 5 on, the only mode from Redis 7.
NOW_MS = """
local function now_ms(pinned)
  if pinned ~= '' then return tonumber(pinned) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


def time_ms(ctx: Context, reply: tuple[int, int]) -> int:
    """Redis's now in ms from a ``TIME`` reply (sent in the same round trip as a read that
    compares times outside a script), or a test's pinned clock (``NOW_MS``'s rule)."""
    pinned = ctx.redis_now_arg()
    return pinned if isinstance(pinned, int) else int(reply[0]) * 1000 + int(reply[1]) // 1000


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1 (what ``EVALSHA`` names it by)."""

    body: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())


def run_script(ctx: Context, lua: Script, numkeys: int, *keys_and_args: Any,
               fast: bool = False) -> Any:
    """Run ``lua`` with its keys and arguments; answers its reply. ``fast`` sends it on
    the fast path's client (``ctx.fast_redis``: a short deadline, no retries)."""
    r = ctx.fast_redis if fast else ctx.redis
    try:
        try:
            return r.evalsha(lua.sha, numkeys, *keys_and_args)
        except NoScriptError:  # a restarted Redis forgot it; EVAL caches it again
            return r.eval(lua.body, numkeys, *keys_and_args)
    except CANDIDATES as e:
        # translated here, off the success path (a context manager there costs a few
        # microseconds a call for nothing); an error that is no outage is raised as it is
        if is_unavailable(e):
            raise unavailable(e, r) from e
        raise
