"""The database schema as an operation: apply or revert the Alembic migrations.

``autonomy db upgrade|downgrade``, ``autonomy up`` and the demo go through these.
"""

from __future__ import annotations

from app.storage import db


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default: the newest)."""
    db.upgrade(database_url, revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Revert migrations down to ``revision`` (default: all of them)."""
    db.downgrade(database_url, revision)
