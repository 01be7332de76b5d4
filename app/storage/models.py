"""SQLModel tables and the str-Enums for statuses.

The schema itself is created by the Alembic migrations in ``app/migrations``; these
classes are the Python view of it (and the metadata the migrations are checked against).
All timestamps are timezone-aware UTC (``UTCDateTime``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from app.kinds import IncidentStatus, Outcome, TaskKind, TaskStatus

__all__ = ["IncidentStatus", "Outcome", "TaskKind", "TaskStatus"]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    PostgreSQL keeps ``timestamptz``; SQLite keeps naive UTC text, so the zone is put
    back on read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; autonomy stores aware UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable)


class Task(SQLModel, table=True):
    """A unit of work queued in a lane (its assignee)."""

    __tablename__ = "task"
    __table_args__ = (
        # the claim's order: the lane's next task is the first entry (migration 0002)
        sa.Index("ix_task_lane_queue", "assignee", "status", sa.text("priority DESC"),
                 "created_at", "id"),
        sa.Index("ix_task_failure_fingerprint", "failure_fingerprint"),
        sa.Index("ix_task_status_lease", "status", "lease_expires_at"),
        sa.Index("ix_task_completed_at", "completed_at"),
        # idempotent create: one task per key in a lane (migration 0006)
        sa.Index("ux_task_dedupe", "assignee", "dedupe_key", unique=True,
                 sqlite_where=sa.text("dedupe_key IS NOT NULL"),
                 postgresql_where=sa.text("dedupe_key IS NOT NULL")),
        # retention: finished tasks oldest first (migration 0006)
        sa.Index("ix_task_finished", "updated_at",
                 sqlite_where=sa.text("status IN ('done', 'cancelled', 'dead')"),
                 postgresql_where=sa.text("status IN ('done', 'cancelled', 'dead')")),
    )

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(sa_type=sa.String(500))
    assignee: str = Field(sa_type=sa.String(64))
    kind: str = Field(default=TaskKind.work.value, sa_type=sa.String(32))
    status: str = Field(default=TaskStatus.todo.value, sa_type=sa.String(32))
    priority: int = Field(default=0)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    result: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    attempts: int = Field(default=0)
    claimed_by: str | None = Field(default=None, sa_type=sa.String(128))
    lease_token: str | None = Field(default=None, sa_type=sa.String(64))
    lease_expires_at: datetime | None = _ts()
    failure_fingerprint: str | None = Field(default=None, sa_type=sa.String(400))
    last_validation_reason: str | None = Field(default=None, sa_type=sa.Text)
    lane_paused: bool = Field(default=False)
    lane_paused_reason: str | None = Field(default=None, sa_type=sa.Text)
    lane_paused_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
    completed_at: datetime | None = _ts()
    # PostgreSQL: the lane slot a live lease holds, below the lane's max_in_flight
    # (migration 0005); SQLite writes none
    lease_slot: int | None = Field(default=None)
    # not claimable before this time: a failure's backoff, a delayed create (migration 0006)
    not_before: datetime | None = _ts()
    # idempotent create: a second create with this key in this lane answers this task
    dedupe_key: str | None = Field(default=None, sa_type=sa.String(200))


class Lane(SQLModel, table=True):
    """A lane: the queue of one assignee, its pause state and its in-flight limit."""

    __tablename__ = "lane"

    assignee: str = Field(primary_key=True, sa_type=sa.String(64))
    paused: bool = Field(default=False)
    paused_reason: str | None = Field(default=None, sa_type=sa.Text)
    paused_at: datetime | None = _ts()
    resumed_at: datetime | None = _ts()
    max_in_flight: int = Field(default=1)
    created_at: datetime = _ts(nullable=False)
    # the task lifecycle (migration 0006); None: the settings' defaults apply
    max_attempts: int | None = Field(default=None)
    backoff_base_s: float | None = Field(default=None)
    backoff_cap_s: float | None = Field(default=None)


class FailureFingerprintLog(SQLModel, table=True):
    """One row per validation failure, kept for counting and analytics."""

    __tablename__ = "failure_fingerprint_log"
    __table_args__ = (sa.Index("ix_ffl_fingerprint_created", "fingerprint", "created_at"),
                      sa.Index("ix_ffl_created_at", "created_at"))

    id: int | None = Field(default=None, primary_key=True)
    fingerprint: str = Field(sa_type=sa.String(400))
    assignee: str = Field(sa_type=sa.String(64))
    reason: str = Field(sa_type=sa.Text)
    task_id: int = Field()
    created_at: datetime = _ts(nullable=False)


class Event(SQLModel, table=True):
    """The audit trail: every decision that changes or refuses something."""

    __tablename__ = "event"
    __table_args__ = (
        sa.Index("ix_event_task", "task_id", "id"),
        sa.Index("ix_event_assignee", "assignee", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts(nullable=False)
    kind: str = Field(sa_type=sa.String(64))
    assignee: str | None = Field(default=None, sa_type=sa.String(64))
    task_id: int | None = Field(default=None)
    actor: str | None = Field(default=None, sa_type=sa.String(128))
    reason: str | None = Field(default=None, sa_type=sa.Text)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class CheckState(SQLModel, table=True):
    """Persisted state of the periodic checks: one row per name, JSON text + write time.

    ``data`` is kept as text (not JSON) on purpose: a torn or hand-edited value must be
    readable as "invalid", never crash the reader.
    """

    __tablename__ = "check_state"

    name: str = Field(primary_key=True, sa_type=sa.String(64))
    data: str = Field(sa_type=sa.Text)
    written_at: datetime = _ts(nullable=False)


task_table: sa.Table = Task.__table__  # type: ignore[attr-defined]
lane_table: sa.Table = Lane.__table__  # type: ignore[attr-defined]
ffl_table: sa.Table = FailureFingerprintLog.__table__  # type: ignore[attr-defined]
event_table: sa.Table = Event.__table__  # type: ignore[attr-defined]
check_state_table: sa.Table = CheckState.__table__  # type: ignore[attr-defined]
