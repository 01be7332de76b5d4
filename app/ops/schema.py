"""The database schema as an operation: apply or revert the Alembic migrations.

``autonomy db upgrade|downgrade|current|history|stamp``, ``autonomy up`` and the demo go
through these.
"""

from __future__ import annotations

from typing import Any

from app.storage import db


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default: the newest)."""
    db.upgrade(database_url, revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Revert migrations down to ``revision`` (default: all of them)."""
    db.downgrade(database_url, revision)


def current(database_url: str) -> dict[str, Any]:
    """The database's revision beside the code's head (``atHead`` when they match)."""
    engine = db.make_engine(database_url)
    try:
        revision, head = db.schema_state(engine)
    finally:
        engine.dispose()
    return {"ok": True, "current": revision, "head": head, "atHead": revision == head}


def history() -> dict[str, Any]:
    """Every migration the code ships, newest first."""
    return {"ok": True, "revisions": db.revisions()}


def stamp(database_url: str, revision: str) -> dict[str, Any]:
    """Record ``revision`` as the database's without running any migration (a database
    whose schema was made another way, e.g. from ``alembic upgrade head --sql``)."""
    db.stamp(database_url, revision)
    return current(database_url)
