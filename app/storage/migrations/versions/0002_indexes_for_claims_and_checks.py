"""Indexes the hot paths read, found by the benchmarks (docs/benchmarks.md):

- ``ix_task_lane_queue`` again, in the claim's own order (priority DESC, created_at, id):
  the next task is the index's first entry instead of a sort of the lane's whole backlog
  while the lane row is locked.
- ``ix_task_completed_at``: the last completion (backlog stall) and the lanes' recent
  completions are index range reads, not scans of every done task.
- ``ix_ffl_created_at``: the status payload's recent fingerprints read the window only.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_task_lane_queue", table_name="task")
    op.create_index("ix_task_lane_queue", "task",
                    ["assignee", "status", sa.text("priority DESC"), "created_at", "id"])
    op.create_index("ix_task_completed_at", "task", ["completed_at"])
    op.create_index("ix_ffl_created_at", "failure_fingerprint_log", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_ffl_created_at", table_name="failure_fingerprint_log")
    op.drop_index("ix_task_completed_at", table_name="task")
    op.drop_index("ix_task_lane_queue", table_name="task")
    op.create_index("ix_task_lane_queue", "task", ["assignee", "status", "priority", "created_at"])
