"""Index task.completed_at: the checks ask for the last completion (backlog stall) with an
index lookup instead of a scan of every done task.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_task_completed_at", "task", ["completed_at"])


def downgrade() -> None:
    op.drop_index("ix_task_completed_at", table_name="task")
