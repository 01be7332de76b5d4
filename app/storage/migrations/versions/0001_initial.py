"""Initial schema: task, lane, failure_fingerprint_log, event, check_state.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

from app.storage.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("assignee", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False, server_default="work"),
        sa.Column("status", sa.String(32), nullable=False, server_default="todo"),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("failure_fingerprint", sa.String(400), nullable=True),
        sa.Column("last_validation_reason", sa.Text(), nullable=True),
        sa.Column("lane_paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("lane_paused_reason", sa.Text(), nullable=True),
        sa.Column("lane_paused_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("status in ('todo','in_progress','done','cancelled')",
                           name="ck_task_status"),
        sa.CheckConstraint("kind in ('work','ops_remediation')", name="ck_task_kind"),
    )
    op.create_index("ix_task_lane_queue", "task", ["assignee", "status", "priority", "created_at"])
    op.create_index("ix_task_failure_fingerprint", "task", ["failure_fingerprint"])
    op.create_index("ix_task_status_lease", "task", ["status", "lease_expires_at"])

    op.create_table(
        "lane",
        sa.Column("assignee", sa.String(64), primary_key=True),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("paused_at", UTCDateTime(), nullable=True),
        sa.Column("resumed_at", UTCDateTime(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("max_in_flight >= 1", name="ck_lane_max_in_flight"),
    )

    op.create_table(
        "failure_fingerprint_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(400), nullable=False),
        sa.Column("assignee", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_ffl_fingerprint_created", "failure_fingerprint_log",
                    ["fingerprint", "created_at"])

    op.create_table(
        "event",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("assignee", sa.String(64), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_event_task", "event", ["task_id", "id"])
    op.create_index("ix_event_assignee", "event", ["assignee", "id"])

    op.create_table(
        "check_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("written_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("check_state")
    op.drop_index("ix_event_assignee", table_name="event")
    op.drop_index("ix_event_task", table_name="event")
    op.drop_table("event")
    op.drop_index("ix_ffl_fingerprint_created", table_name="failure_fingerprint_log")
    op.drop_table("failure_fingerprint_log")
    op.drop_table("lane")
    op.drop_index("ix_task_status_lease", table_name="task")
    op.drop_index("ix_task_failure_fingerprint", table_name="task")
    op.drop_index("ix_task_lane_queue", table_name="task")
    op.drop_table("task")
