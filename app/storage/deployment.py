"""The ``deployment`` table (migration 0008): which Redis and key prefix the database
belongs to. One row, ``id`` 1; SQL only -- the rule (who binds, who is refused) is
``app.ops.deployment``'s.

The table is declared here, on a metadata of its own, not among the SQLModel entities:
nothing but this module reads or writes it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from app.storage.db import is_postgres, transaction
from app.storage.models import UTCDateTime

ROW_ID = 1

deployment_table = sa.Table(
    "deployment", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("redis_identity", sa.String(500), nullable=False),
    sa.Column("redis_prefix", sa.String(200), nullable=False),
    sa.Column("bound_at", UTCDateTime, nullable=False),
    sa.Column("bound_by", sa.String(300), nullable=False),
)


@dataclass(frozen=True)
class Binding:
    """A database's deployment: its Redis's identity and key prefix, and who bound it."""

    redis_identity: str
    redis_prefix: str
    bound_at: datetime
    bound_by: str

    def same_deployment(self, other: Binding) -> bool:
        """True when ``other`` names the same Redis and prefix (whoever bound it)."""
        return (self.redis_identity, self.redis_prefix) == (other.redis_identity,
                                                            other.redis_prefix)


def _row(b: Binding) -> dict[str, Any]:
    return {"id": ROW_ID, "redis_identity": b.redis_identity, "redis_prefix": b.redis_prefix,
            "bound_at": b.bound_at, "bound_by": b.bound_by}


def _read(conn: sa.Connection) -> Binding | None:
    t = deployment_table
    row = conn.execute(sa.select(t.c.redis_identity, t.c.redis_prefix, t.c.bound_at,
                                 t.c.bound_by).where(t.c.id == ROW_ID)).first()
    return None if row is None else Binding(*row)


def read(engine: Engine) -> Binding | None:
    """The database's binding, or None while unbound. ``DatabaseNotMigrated`` before 0008."""
    with transaction(engine, write=False) as conn:
        return _read(conn)


def bind_if_unbound(engine: Engine, binding: Binding) -> Binding:
    """Bind an unbound database to ``binding``; answers the binding in force (the one
    just written, or the one found). Racing binders: the first insert wins (one row)."""
    insert = (postgresql.insert if is_postgres(engine) else sqlite.insert)(deployment_table)
    with transaction(engine) as conn:
        conn.execute(insert.values(**_row(binding)).on_conflict_do_nothing(
            index_elements=["id"]))
        found = _read(conn)
    assert found is not None  # inserted, or there already
    return found


def rebind(engine: Engine, binding: Binding) -> Binding | None:
    """Bind the database to ``binding`` whatever it was bound to; answers the previous
    binding (None when it was unbound)."""
    with transaction(engine) as conn:
        previous = _read(conn)
        conn.execute(sa.delete(deployment_table).where(deployment_table.c.id == ROW_ID))
        conn.execute(sa.insert(deployment_table).values(**_row(binding)))
    return previous
