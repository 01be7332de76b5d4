"""The database schema as an operation: apply or revert the Alembic migrations.

``autonomy db upgrade|downgrade|current|history|stamp``, ``autonomy up`` and the demo go
through these.

A downgrade is the one command that destroys data (SPEC 4.12): it needs an explicit
revision, and it refuses -- naming what would be lost -- to go to ``base`` (every table
dropped) or to run while leases are live, unless ``force`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.clock import utcnow
from app.errors import DowngradeRefused
from app.storage import db, inventory


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default: the newest)."""
    db.upgrade(database_url, revision)


@dataclass(frozen=True)
class Downgrade:
    """What a downgrade did (or would do): the revisions reverted, newest first, whether
    it went to ``base``, and what the database held before."""

    reverted: list[str]
    to_base: bool
    held: inventory.Holdings


def downgrade(database_url: str, revision: str, *, force: bool = False) -> Downgrade:
    """Revert migrations down to ``revision`` (an id, ``base`` or ``-N``). Without
    ``force`` it raises ``DowngradeRefused`` when that drops every table or while leases
    are live; ``InvalidInput`` for an unknown revision."""
    engine = db.make_engine(database_url)
    try:
        plan, to_base = db.downgrade_plan(engine, revision)
        held = inventory.count(engine, now=utcnow())
    finally:
        engine.dispose()
    if plan and not force:
        why = []
        if to_base:
            why.append("it drops every table")
        if held.live_leases:
            why.append(f"{held.live_leases} leases are live (workers are running tasks)")
        if why:
            raise DowngradeRefused(
                f"refusing to downgrade to {revision} (reverting {', '.join(plan)}): "
                f"{' and '.join(why)}; the database holds {held.describe()}"
                f"{' that would be lost' if to_base else ''}. Stop the workers first, or "
                "give --force to do it anyway",
                revision=revision, reverting=plan, unfinishedTasks=held.unfinished_tasks,
                liveLeases=held.live_leases, events=held.events)
    if plan:
        db.downgrade(database_url, revision)
    return Downgrade(plan, to_base, held)


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
