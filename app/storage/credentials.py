"""The credentials' SQL (migration 0007): the ``credential`` table, the hashing key, and
the reads the API makes on every authenticated request (by the secret's hash, indexed).

Kept beside ``store.py`` rather than in it: one concept, and the task store's hot paths
stay as they are.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.storage.models import UTCDateTime

_meta = sa.MetaData()

credential_table = sa.Table(
    "credential", _meta,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("lanes", sa.JSON(), nullable=False),
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("worker_prefix", sa.String(128), nullable=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=True),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Column("revoked_by", sa.String(128), nullable=True),
    # as migration 0007 makes them (so `alembic check` compares like with like)
    sa.Index("ix_credential_secret_hash", "secret_hash", unique=True),
    sa.Index("ix_credential_active_name", "name", unique=True,
             postgresql_where=sa.text("revoked_at IS NULL"),
             sqlite_where=sa.text("revoked_at IS NULL")),
)
credential_key_table = sa.Table(
    "credential_key", _meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("key", sa.String(64), nullable=False),
)
C = credential_table


def hashing_key(conn: Connection) -> str:
    """The deployment's HMAC key (made by migration 0007)."""
    key = conn.execute(sa.select(credential_key_table.c.key)
                       .where(credential_key_table.c.id == 1)).scalar()
    if key is None:  # a table emptied by hand: make it again (every credential is void)
        key = secrets.token_hex(32)
        conn.execute(sa.insert(credential_key_table).values(id=1, key=key))
    return str(key)


def insert(conn: Connection, *, name: str, scope: str, lanes: Sequence[str],
           worker: str | None, worker_prefix: str | None, secret_hash: str, now: datetime,
           created_by: str | None) -> RowMapping:
    """A new credential row."""
    return conn.execute(sa.insert(C).values(
        name=name, scope=scope, lanes=list(lanes), worker=worker, worker_prefix=worker_prefix,
        secret_hash=secret_hash, created_at=now, created_by=created_by
    ).returning(*C.c)).mappings().one()


def by_hash(conn: Connection, *, secret_hash: str) -> RowMapping | None:
    """The live (not revoked) credential whose secret hashes to ``secret_hash``."""
    return conn.execute(sa.select(C).where(C.c.secret_hash == secret_hash,
                                           C.c.revoked_at.is_(None))).mappings().first()


def active_by_name(conn: Connection, *, name: str) -> RowMapping | None:
    """The live credential named ``name``."""
    return conn.execute(sa.select(C).where(C.c.name == name, C.c.revoked_at.is_(None))
                        ).mappings().first()


def any_minted(conn: Connection) -> bool:
    """Was any credential ever minted (revoked ones count: revoking the last credential
    must not open the server)?"""
    return conn.execute(sa.select(C.c.id).limit(1)).first() is not None


def counts(conn: Connection) -> tuple[int, int]:
    """``(minted, live)``: every credential row (revoked ones too), and the live ones."""
    row = conn.execute(sa.select(
        sa.func.count(), sa.func.count().filter(C.c.revoked_at.is_(None)))).one()
    return int(row[0]), int(row[1])


def list_all(conn: Connection, *, include_revoked: bool) -> Sequence[RowMapping]:
    """Credentials, oldest first (never their hashes' secrets: there are none stored)."""
    q = sa.select(C).order_by(C.c.id)
    if not include_revoked:
        q = q.where(C.c.revoked_at.is_(None))
    return conn.execute(q).mappings().all()


def revoke(conn: Connection, *, name: str, now: datetime, by: str | None) -> int:
    """Revoke the live credential named ``name``; the rows changed (0 or 1)."""
    return conn.execute(sa.update(C).where(C.c.name == name, C.c.revoked_at.is_(None))
                        .values(revoked_at=now, revoked_by=by)).rowcount


def row_dict(row: RowMapping) -> dict[str, Any]:
    """A credential row as a plain dict (without its hash)."""
    return {k: v for k, v in dict(row).items() if k != "secret_hash"}
