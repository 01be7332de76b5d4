"""What a database holds that an operator could lose: unfinished tasks, live leases and
the audit trail, counted before a destructive schema change (``autonomy db downgrade``).

Read-only; a database without the tables (never migrated, or already downgraded to
``base``) holds nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app.storage.db import is_postgres, transaction
from app.storage.models import event_table, task_table

UNFINISHED = ("todo", "in_progress")


@dataclass(frozen=True)
class Holdings:
    """Counts of what a database holds."""

    unfinished_tasks: int
    live_leases: int
    events: int

    def describe(self) -> str:
        """``97 unfinished tasks, 4 live leases, 1204 events``."""
        return (f"{self.unfinished_tasks} unfinished tasks, {self.live_leases} live leases, "
                f"{self.events} events")


def count(engine: Engine, *, now: datetime) -> Holdings:
    """Count unfinished tasks, leases that have not expired (PostgreSQL: by the database's
    clock, SPEC 4.9; SQLite: ``now``, the host's) and events."""
    tables = set(sa.inspect(engine).get_table_names())
    if "task" not in tables:
        return Holdings(0, 0, 0)
    t = task_table
    live_at = sa.func.now() if is_postgres(engine) else sa.literal(now, t.c.lease_expires_at.type)
    with transaction(engine, write=False) as conn:
        unfinished = conn.execute(sa.select(sa.func.count()).select_from(t)
                                  .where(t.c.status.in_(UNFINISHED))).scalar_one()
        live = conn.execute(sa.select(sa.func.count()).select_from(t).where(
            t.c.status == "in_progress", t.c.lease_expires_at > live_at)).scalar_one()
        events = (conn.execute(sa.select(sa.func.count()).select_from(event_table)).scalar_one()
                  if "event" in tables else 0)
    return Holdings(int(unfinished), int(live), int(events))
