"""Count what one claim + complete cycle costs on the wire: PostgreSQL round trips and
transactions, Redis round trips.

PostgreSQL is counted from libpq's own protocol trace (``PGconn.trace``) of every
connection the context's engine opens: each ``ReadyForQuery`` the server sends ends one
round trip (autonomy does not use pipeline mode), its status byte says whether a
transaction is still open, and the statements sent are kept so a count that grows can be
read. A transaction is counted when the server goes back to idle (``COMMIT`` /
``ROLLBACK``, or a statement run outside ``BEGIN``), except the pool's connection ping.
Redis is counted at redis-py's socket write (``send_packed_command``): a pipeline is one
write, so one round trip, like a single command or one script call.

Used by bench 3c (``python -m bench --only 10``) and asserted by
``tests/test_roundtrips.py`` so the count cannot grow back unnoticed.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

_PING = {"SELECT 1", ";", ""}


@dataclass
class WireCount:
    """What a piece of work sent: counts and the statements (first line of each)."""

    pg_round_trips: int = 0
    pg_transactions: int = 0
    pg_pings: int = 0
    redis_round_trips: int = 0
    statements: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"pgRoundTrips": self.pg_round_trips, "pgTransactions": self.pg_transactions,
                "pgPings": self.pg_pings, "redisRoundTrips": self.redis_round_trips,
                "statements": self.statements}


class PgTrace:
    """libpq traces of every connection ``engine`` opens from now on."""

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("PgTrace counts PostgreSQL round trips only")
        self._conns: dict[int, tuple[Any, Any]] = {}
        self.prepared: dict[int, dict[str, str]] = {}  # connection -> statement name -> SQL
        self._lock = threading.Lock()
        sa.event.listen(engine, "connect", self._on_connect)

    def _on_connect(self, dbapi_conn: Any, _record: Any) -> None:
        self._start(dbapi_conn)

    def _start(self, dbapi_conn: Any) -> None:
        import psycopg

        f = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 -- closed by take()
        dbapi_conn.pgconn.trace(f.fileno())
        dbapi_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS
                                          | psycopg.pq.Trace.REGRESS_MODE)
        with self._lock:
            self._conns[id(dbapi_conn)] = (dbapi_conn, f)

    def close(self) -> None:
        """Stop tracing and close the trace files."""
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for dbapi_conn, f in conns:
            if not dbapi_conn.closed:
                dbapi_conn.pgconn.untrace()
            f.close()

    def take(self) -> list[tuple[int, list[str]]]:
        """Each connection's trace lines since the last ``take`` (traces restart afresh)."""
        lines: list[tuple[int, list[str]]] = []
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for dbapi_conn, f in conns:
            if dbapi_conn.closed:
                f.close()
                continue
            dbapi_conn.pgconn.untrace()  # flushes libpq's buffer into the file
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            lines.append((id(dbapi_conn), f.read().splitlines()))
            f.close()
            self._start(dbapi_conn)
        return lines


def parse_trace(traces: list[tuple[int, list[str]]],
                prepared: dict[int, dict[str, str]]) -> WireCount:
    """Round trips, transactions and statements from libpq trace lines (``prepared``
    remembers each connection's named statements, which later run by name alone)."""
    out = WireCount()
    for conn_id, lines in traces:
        _parse_one(lines, prepared.setdefault(conn_id, {}), out)
    return out


def _parse_one(lines: list[str], names: dict[str, str], out: WireCount) -> None:
    sent: list[str] = []
    parsed = False  # a named Parse: psycopg prepares a statement in a round trip of its own
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        direction, msg = parts[0], parts[2]
        text = parts[3].strip() if len(parts) > 3 else ""
        if direction == "F" and msg == "Query":
            sent.append(_flat(text.strip('"')))
        elif direction == "F" and msg == "Parse":
            name, sql = _quoted(text, 2)
            if name:
                names[name] = _flat(sql)
                parsed = True
            else:
                sent.append(_flat(sql))
        elif direction == "F" and msg == "Bind":
            _portal, name = _quoted(text, 2)
            if name:
                sent.append(names.get(name, f"prepared {name}"))
        elif direction == "B" and msg == "ReadyForQuery":
            out.pg_round_trips += 1
            ping = bool(sent) and all(s in _PING for s in sent) and not parsed
            if ping:
                out.pg_pings += 1
            elif text == "I" and sent and sent != ["BEGIN"]:
                out.pg_transactions += 1
            out.statements.extend(s for s in sent if s not in _PING or not ping)
            sent, parsed = [], False


def _quoted(text: str, n: int) -> list[str]:
    """The first ``n`` double-quoted fields of a trace line's message text."""
    out, i = [], 0
    while len(out) < n:
        start = text.find('"', i)
        end = text.find('"', start + 1)
        if start < 0:
            out.append("")
            continue
        if end < 0:  # a multi-line statement: the trace line holds its first line
            out.append(text[start + 1:])
            i = len(text)
            continue
        out.append(text[start + 1:end])
        i = end + 1
    return out


def _flat(sql: str) -> str:
    return " ".join(sql.split())[:160]


class RedisCount:
    """Counts socket writes of every redis-py connection in this process."""

    def __init__(self) -> None:
        self.n = 0

    @contextmanager
    def active(self) -> Iterator[RedisCount]:
        cls = redis.connection.AbstractConnection
        orig = cls.send_packed_command
        me = self

        def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            me.n += 1
            return orig(conn, command, check_health)

        cls.send_packed_command = counted  # type: ignore[method-assign]
        try:
            yield self
        finally:
            cls.send_packed_command = orig  # type: ignore[method-assign]


def count_wire(trace: PgTrace, fn: Callable[[], Any]) -> WireCount:
    """Run ``fn`` once and answer what it sent."""
    parse_trace(trace.take(), trace.prepared)  # learn the statements prepared so far
    with RedisCount().active() as rc:
        fn()
    got = parse_trace(trace.take(), trace.prepared)
    got.redis_round_trips = rc.n
    return got
