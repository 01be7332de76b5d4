"""Lua scripts on a kept connection: the hot path of run-locks and claim leases.

``run_script(ctx, script, numkeys, *keys_and_args)`` sends ``EVALSHA`` (``EVAL`` once
after a Redis restart) on one connection of the client's pool that each context keeps,
with the client's retry policy, and translates connection errors into
``RedisUnavailable``. Threads of one context (a job and its heartbeat) take turns on it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import NoScriptError

from app.storage.context import Context
from app.storage.redis_conn import redis_errors


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1 (what ``EVALSHA`` names it by)."""

    body: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())


def run_script(ctx: Context, lua: Script, numkeys: int, *keys_and_args: Any) -> Any:
    """Run ``lua`` with its keys and arguments; answers its reply."""
    r = ctx.redis
    try:
        try:
            return _command(ctx, ("EVALSHA", lua.sha, numkeys, *keys_and_args))
        except NoScriptError:  # a restarted Redis forgot it; EVAL caches it again
            return _command(ctx, ("EVAL", lua.body, numkeys, *keys_and_args))
    except (redis.ConnectionError, redis.TimeoutError):
        # redis_errors translates it; entered only on failure, because a generator
        # context manager costs ~2 us a call, and a lock cycle is two calls
        with redis_errors(r):
            raise


@dataclass
class _Line:
    """A connection of the client's pool that this module keeps for its scripts."""

    client: redis.Redis
    pid: int
    conn: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


_LINES = threading.Lock()


def _line(ctx: Context) -> _Line:
    r, pid = ctx.redis, os.getpid()
    line: _Line | None = ctx.__dict__.get("_lock_line")
    if line is not None and line.client is r and line.pid == pid:
        return line
    with _LINES:
        line = ctx.__dict__.get("_lock_line")
        if line is None or line.client is not r or line.pid != pid:
            if line is not None and line.pid == pid:  # the context got another client
                with line.lock:
                    line.client.connection_pool.release(line.conn)
            # after a fork the parent's connection is left alone: its pool resets itself
            line = _Line(client=r, pid=pid, conn=r.connection_pool.get_connection())
            ctx.__dict__["_lock_line"] = line
    return line


def _command(ctx: Context, args: tuple[Any, ...]) -> Any:
    """Send one command and read its reply on the context's line (one connection of the
    client's pool, kept), with the client's retry policy.

    Why not ``execute_command``: redis-py 8 spends ~25 us a call here on pool checkout,
    observability and dispatch, and a lock cycle is two calls (~200 us in all for a
    plain Redis lock). EVAL replies have no response callback to apply. Threads of one
    context (a job and its heartbeat) take turns on the line.
    """
    r = ctx.redis
    if r.connection is not None:  # a single-connection client: keep its own locking
        return r.execute_command(*args)
    line = _line(ctx)
    conn = line.conn
    with line.lock:
        return conn.retry.call_with_retry(lambda: _send_read(conn, args),
                                          lambda _error: conn.disconnect())


def _send_read(conn: Any, args: tuple[Any, ...]) -> Any:
    # the pool's checkout test: a connection the server closed (idle timeout, restart) or
    # that has a stray reply is replaced, not used -- with no retries, it would fail
    try:
        stale = conn.can_read()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        stale = True
    if stale:
        conn.disconnect()
    try:
        conn.send_command(*args)
        return conn.read_response()
    except redis.ResponseError:
        raise  # the error reply was read in full: the connection is in step
    except BaseException:
        conn.disconnect()  # sent but not read: never reuse a connection out of step
        raise


