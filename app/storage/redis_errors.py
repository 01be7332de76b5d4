"""Which Redis failures mean "Redis is unavailable" (SPEC 4.7), decided in one place.

A Redis that answers with an error is as good as a Redis that is down: the fleet's
callers (the fast path of claim/heartbeat/complete, run-locks, the beat leader lease,
pickup, status, ``/readyz``, ``/metrics``) treat both as ``RedisUnavailable`` -- the
fast path falls back to the database, the probes say ``redis: degraded`` -- and never as
an unexpected ``internal_error``. Unavailable is:

- no answer: ``ConnectionError`` (refused, reset, a name that does not resolve, too many
  clients), ``TimeoutError``, any ``OSError`` a socket raises (TLS errors are ``ssl.
  SSLError``, an ``OSError``), an answer that is not Redis's protocol;
- an error reply that says the server cannot serve us now, whatever the command:
  ``OOM`` (full under ``noeviction``/``volatile-*``), ``READONLY`` (a replica after a
  failover), ``NOAUTH``/``WRONGPASS``/``NOPERM`` (credentials, ACL), ``DENIED``
  (protected mode), ``LOADING`` (reading its dataset at start), ``MISCONF`` (it cannot
  persist and refuses writes), ``BUSY`` (a script runs long), ``MASTERDOWN``,
  ``NOREPLICAS``, ``CLUSTERDOWN``, ``TRYAGAIN``, ``UNBLOCKED`` (a blocked ``BRPOP`` let go
  because the server turned replica). Inside a Lua script Redis 6 wraps such a
  reply in ``ERR Error running script ... -OOM ...``; that is read through.

Any other error reply (``WRONGTYPE``, a script's own error, ...) is a bug or foreign data,
not an outage: it is raised as it is.

``is_timeout`` tells a missed deadline apart from a definite refusal: one slow answer from
a busy Redis is not yet an outage (``RedisHealth`` counts consecutive misses).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import InvalidResponse

from app.errors import RedisUnavailable

UNAVAILABLE_REPLIES = frozenset({
    "OOM", "READONLY", "NOAUTH", "WRONGPASS", "NOPERM", "DENIED", "LOADING", "MISCONF",
    "BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN", "UNBLOCKED",
})
# an error reply relayed from inside a Lua script (Redis 6: "ERR Error running script
# (call to f_...): @user_script:2: -OOM command not allowed ...")
_IN_SCRIPT = re.compile(r"-(" + "|".join(sorted(UNAVAILABLE_REPLIES)) + r")\b")

# exception types worth a look: every redis-py error and the socket's own
CANDIDATES: tuple[type[Exception], ...] = (redis.RedisError, OSError)
# the same, with the translation of the unavailable ones (what a best-effort call catches)
ANY_REDIS_ERROR: tuple[type[Exception], ...] = (RedisUnavailable, *CANDIDATES)


def reply_code(e: BaseException) -> str | None:
    """The error reply's code (``OOM``, ``READONLY``, ...) of a Redis error reply, the one
    relayed from inside a script included; None for anything else."""
    if not isinstance(e, redis.RedisError):
        return None
    code = getattr(e, "status_code", None)  # redis-py puts it on what it parsed
    text = str(e)
    if not isinstance(e, redis.ResponseError):  # NOAUTH, LOADING: ConnectionError's kin
        return code if code in UNAVAILABLE_REPLIES else None
    if not code:
        code = text.split(" ", 1)[0] if text else None
    if code in UNAVAILABLE_REPLIES:
        return code
    found = _IN_SCRIPT.search(text)
    if found:
        return found.group(1)
    return code if code and code.isupper() else None


def is_unavailable(e: BaseException) -> bool:
    """Does ``e`` mean Redis cannot serve the fleet now (down, stalled, refusing)?"""
    if isinstance(e, RedisUnavailable):
        return True
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, InvalidResponse,
                      OSError)):
        return True
    if isinstance(e, redis.ResponseError):
        return reply_code(e) in UNAVAILABLE_REPLIES
    return False


def is_timeout(e: BaseException) -> bool:
    """Did Redis miss a deadline (as opposed to refusing or erring at once)? Looks through
    a ``RedisUnavailable`` to the redis-py error it was raised from."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (redis.TimeoutError, socket.timeout)):
            return True
        seen = seen.__cause__
    return False


def describe(e: BaseException) -> str:
    """One line naming the failure: the reply code when Redis answered with an error."""
    code = reply_code(e)
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if code and not text.startswith(code):
        return f"{code} {text}"
    return text or type(e).__name__


def where(client: redis.Redis) -> str:
    """``host:port`` (or the socket path) the client talks to, for messages."""
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)  # a Sentinel pool: the master's name
    if service is not None:
        return f"Sentinel master {service}"
    kw: dict[str, Any] = pool.connection_kwargs
    return str(kw.get("path") or f"{kw.get('host')}:{kw.get('port')}")


def unavailable(e: BaseException, client: redis.Redis | None = None) -> RedisUnavailable:
    """The ``RedisUnavailable`` to raise from ``e`` (``raise unavailable(e) from e``)."""
    at = f" at {where(client)}" if client is not None else ""
    code = reply_code(e)
    if code:
        return RedisUnavailable(f"Redis{at} refuses the command: {describe(e)}",
                                redisError=code)
    return RedisUnavailable(f"Redis cannot be reached{at}: {describe(e)}")


@contextmanager
def redis_errors(client: redis.Redis | None = None) -> Iterator[None]:
    """Turn every redis-py error that means "unavailable" into ``RedisUnavailable``
    (others are raised as they are: they are bugs, not outages)."""
    try:
        yield
    except CANDIDATES as e:
        if not is_unavailable(e):
            raise
        raise unavailable(e, client) from e
