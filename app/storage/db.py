"""Engines, transactions and migrations. SQLite by default, PostgreSQL by URL.

SQLite runs in WAL mode with a busy timeout; a write transaction starts with
``BEGIN IMMEDIATE`` so two writers queue instead of failing on lock upgrade.
PostgreSQL uses psycopg 3. Connection failures surface as ``DatabaseUnavailable``.

No ping on every checkout: a connection that sat in the pool for less than
``IDLE_PING_AFTER_S`` is used as it is (the hot path runs back to back), an older one is
pinged first and replaced when dead; a hot-path statement that finds its connection dead
anyway is run once more on a fresh one (``autocommit``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from app.errors import DatabaseBusy, DatabaseNotMigrated, DatabaseUnavailable, InvalidInput

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_WRITE = "autonomy_write"
# a pooled connection idle for longer than this is pinged before use (a server restart or
# an idle timeout is found then, not by the statement)
IDLE_PING_AFTER_S = 2.0


def normalise_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgres://`` / ``postgresql://`` URLs."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def missing_sqlite_file(url: str) -> str | None:
    """The path of the SQLite file ``url`` names when it does not exist yet (connecting
    would create it), or None (it exists, in memory, or not SQLite)."""
    parsed = sa.engine.make_url(normalise_url(url))
    path = parsed.database
    if not parsed.drivername.startswith("sqlite") or not path or path == ":memory:" \
            or path.startswith("file:"):
        return None
    return None if Path(path).exists() else path


def make_engine(url: str, *, connect_timeout_s: float = 5.0, busy_timeout_s: float = 30.0,
                pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """An engine for ``url``, configured for autonomy's transaction rules."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}
        )
        _configure_sqlite(engine, busy_timeout_s)
        return engine
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # the connection returned last is handed out first: the hot path keeps to a warm
        # backend (prepared statements, caches) while the rest of the pool sits idle
        pool_use_lifo=True,
        connect_args={"connect_timeout": max(1, int(connect_timeout_s))},
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's pessimistic disconnect handling, for idle connections only: the
    ``checkout`` handler raises ``DisconnectionError`` on a dead one and the pool retries
    with a new connection."""

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_AFTER_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:
            raise sa.exc.DisconnectionError(f"pooled connection is dead: {e}") from e


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # let SQLAlchemy, not pysqlite, decide when a transaction begins
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def is_postgres(engine: Engine) -> bool:
    """True when the engine talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Connection]:
    """One transaction; committed on success, rolled back on any error.

    ``write=True`` takes SQLite's write lock up front. Operational errors (server gone,
    refused, timed out) become ``DatabaseUnavailable``.
    """
    try:
        with engine.connect() as raw:
            conn = raw.execution_options(**{_WRITE: write})
            with conn.begin():
                yield conn
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.ProgrammingError) as e:
        err = _translate(engine, e)
        if err is e:
            raise
        raise err from e


def hot(engine: Engine, sql: str, params: dict[str, Any], *, repeatable: bool = True
        ) -> list[Any]:
    """PostgreSQL: one statement that commits on its own, straight on a pooled
    connection's psycopg connection (prepared, rows as tuples) -- the hot path without
    SQLAlchemy's statement and result machinery, which cost as much CPU as the round trip
    itself. No ``BEGIN``/``COMMIT`` round trips: the statement commits on its own. Run
    once more on a fresh connection when the pooled one turned out dead (the server
    restarted since it was last used), if ``repeatable``: a claim or complete whose first
    try may have landed is answered by its guard the second time; a create is not safe to
    repeat. Errors are translated as in ``transaction``."""
    for attempt in (1, 2) if repeatable else (2,):
        dbapi_error = engine.dialect.loaded_dbapi.Error
        try:
            raw = engine.raw_connection()
        except sa.exc.DBAPIError as e:
            raise _translate(engine, e) from e
        except dbapi_error as e:  # the pool hands out the driver's own connect error
            raise _translate(engine, _wrap(sql, params, e, dbapi_error)) from e
        pg: Any = raw.driver_connection
        try:
            pg.autocommit = True
            try:
                return list(pg.execute(sql, params, prepare=True).fetchall())
            finally:
                if not pg.closed:
                    pg.autocommit = False
        except Exception as e:
            dead = pg.closed or pg.broken
            if dead:
                raw.invalidate(e)
            if not isinstance(e, dbapi_error):
                raise
            if dead and attempt == 1:
                continue
            raise _translate(engine, _wrap(sql, params, e, dbapi_error)) from e
        finally:
            raw.close()
    raise AssertionError("unreachable")


def _wrap(sql: str, params: Any, e: Exception, dbapi_error: Any) -> sa.exc.DBAPIError:
    """The driver's error as SQLAlchemy would have raised it."""
    wrapped = sa.exc.DBAPIError.instance(sql, params, e, dbapi_error)
    assert isinstance(wrapped, sa.exc.DBAPIError)
    return wrapped


def _translate(engine: Engine, e: sa.exc.DBAPIError) -> Exception:
    if _is_missing_schema(e):
        return DatabaseNotMigrated(
            "the database has no autonomy schema: run `autonomy db upgrade`",
            url=_safe_url(engine))
    if isinstance(e, sa.exc.ProgrammingError):
        return e
    if isinstance(e, sa.exc.OperationalError) and _is_lock_conflict(e):
        return DatabaseBusy(f"the database gave up on a lock, nothing was changed; "
                            f"retry: {_first_line(e)}")
    return DatabaseUnavailable(f"the database cannot be reached: {_first_line(e)}",
                               url=_safe_url(engine))


def _is_missing_schema(e: sa.exc.DBAPIError) -> bool:
    text = str(e.orig).lower()
    return "no such table" in text or (("relation" in text or "function autonomy_" in text)
                                       and "does not exist" in text)


def _is_lock_conflict(e: sa.exc.OperationalError) -> bool:
    text = str(e.orig).lower()
    return ("deadlock" in text or "could not serialize" in text
            or "database is locked" in text or "lock timeout" in text)


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


# --- migrations -------------------------------------------------------------------


def alembic_config(url: str) -> Any:
    """An Alembic config pointed at our migrations and ``url``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    try:
        command.upgrade(alembic_config(url), revision)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
        raise DatabaseUnavailable(f"the database cannot be reached: {_first_line(e)}") from e


def downgrade(url: str, revision: str = "base") -> None:
    """Revert migrations down to ``revision``."""
    from alembic import command

    try:
        command.downgrade(alembic_config(url), revision)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
        raise DatabaseUnavailable(f"the database cannot be reached: {_first_line(e)}") from e


def downgrade_plan(engine: Engine, revision: str) -> tuple[list[str], bool]:
    """The revisions a downgrade to ``revision`` would revert (newest first), and whether
    it ends at ``base`` (every table dropped). ``revision`` is a revision id, ``base``, or
    ``-N`` (N steps below the database's revision, as Alembic reads it). Raises
    ``InvalidInput`` for a revision the migrations do not have."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    current = current_revision(engine)
    if current is None:
        return [], False
    try:
        chain = [r.revision for r in script.iterate_revisions(current, "base")]
        if revision == "base":
            plan = chain
        elif revision.startswith("-") and revision[1:].isdigit():
            plan = chain[:int(revision[1:])]
        else:
            target = script.get_revision(revision)
            if target is None:
                return chain, True
            plan = [r.revision for r in script.iterate_revisions(current, target.revision)]
    except CommandError as e:
        raise InvalidInput(f"cannot downgrade to {revision!r}: {e}", field="revision") from e
    return plan, bool(plan) and len(plan) == len(chain)


def stamp(url: str, revision: str) -> None:
    """Record ``revision`` as the database's, running no migration."""
    from alembic import command
    from alembic.util import CommandError

    try:
        command.stamp(alembic_config(url), revision)
    except CommandError as e:  # no such revision
        raise InvalidInput(str(e)) from e
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
        raise DatabaseUnavailable(f"the database cannot be reached: {_first_line(e)}") from e


def revisions() -> list[dict[str, Any]]:
    """The migrations this code ships, newest first: revision, the one it follows, whether
    it is the head, and its first docstring line."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    heads = set(script.get_heads())
    return [{"revision": rev.revision, "downRevision": rev.down_revision,
             "head": rev.revision in heads, "doc": (rev.doc or "").strip().splitlines()[0]
             if rev.doc else ""}
            for rev in script.walk_revisions()]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest revision of the migrations this code ships."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def schema_state(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's revision, the code's head); raises ``DatabaseUnavailable`` when
    the database cannot be reached."""
    try:
        current = current_revision(engine)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
        raise DatabaseUnavailable(f"the database cannot be reached: {_first_line(e)}",
                                  url=_safe_url(engine)) from e
    return current, head_revision()
