"""The task lifecycle (issue 21, SPEC 4.11): attempts and ``dead``, backoff, delayed
tasks, idempotent create, cancel.

- ``task.not_before`` (nullable): the task is not claimable before this time -- a
  failure's backoff, or a create's ``notBefore`` / ``delayS``. Both claim paths skip a
  task not yet due: SQLite's ``store.claim_next`` and PostgreSQL's ``autonomy_claim``
  (new version here, ``0006_task_lifecycle_claim.sql``).
- ``task.dedupe_key`` (nullable) with the partial unique index ``ux_task_dedupe`` on
  ``(assignee, dedupe_key) WHERE dedupe_key IS NOT NULL``: racing creates with one key
  in one lane make one task, enforced by the index (the losers' inserts do nothing and
  answer the winner's task). The key stays on the task after it finishes, so the
  retention window after a finish is the task row's own life: until retention prunes the
  row, a create with its key answers it.
- ``lane.max_attempts``, ``lane.backoff_base_s``, ``lane.backoff_cap_s`` (nullable: the
  settings ``default_max_attempts``, ``backoff_base_s``, ``backoff_cap_s`` apply).
- ``ix_task_finished``: finished tasks by ``updated_at`` (a partial index), which the
  retention job prunes in batches, oldest first.
- the task status ``dead`` (``ck_task_status``): a task that failed ``max_attempts``
  times.

Both PL/pgSQL functions are written out whole in the ``.sql`` files beside this
migration (the house rule: never assembled from an earlier migration's text);
``autonomy_complete`` keeps 0005's behaviour. Downgrade restores 0005's functions, drops
the columns and the index, and turns ``dead`` tasks back into ``todo`` ones (the status
0005 knows; their attempts are kept).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import importlib
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from app.storage.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_HERE = Path(__file__).resolve().parent
CLAIM_FUNCTION = (_HERE / "0006_task_lifecycle_claim.sql").read_text(encoding="utf-8")
COMPLETE_FUNCTION = (_HERE / "0006_task_lifecycle_complete.sql").read_text(encoding="utf-8")

# retention's batches read finished tasks oldest first: only finished rows are indexed,
# so claims and completes of live tasks never maintain it
_FINISHED = "status IN ('done', 'cancelled', 'dead')"
_STATUSES_0005 = "status in ('todo','in_progress','done','cancelled')"
_STATUSES_0006 = "status in ('todo','in_progress','done','cancelled','dead')"


def upgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.add_column(sa.Column("not_before", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("dedupe_key", sa.String(200), nullable=True))
        batch.drop_constraint("ck_task_status", type_="check")
        batch.create_check_constraint("ck_task_status", _STATUSES_0006)
    op.create_index("ux_task_dedupe", "task", ["assignee", "dedupe_key"], unique=True,
                    sqlite_where=sa.text("dedupe_key IS NOT NULL"),
                    postgresql_where=sa.text("dedupe_key IS NOT NULL"))
    op.create_index("ix_task_finished", "task", ["updated_at"],
                    sqlite_where=sa.text(_FINISHED), postgresql_where=sa.text(_FINISHED))
    with op.batch_alter_table("lane") as batch:
        batch.add_column(sa.Column("max_attempts", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("backoff_base_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("backoff_cap_s", sa.Float(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CLAIM_FUNCTION)
        op.execute(COMPLETE_FUNCTION)


def downgrade() -> None:
    v5 = importlib.import_module("app.storage.migrations.versions.0005_lease_slots")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(v5.CLAIM_FUNCTION)
        op.execute(v5.COMPLETE_FUNCTION)
    op.execute("UPDATE task SET status = 'todo' WHERE status = 'dead'")
    with op.batch_alter_table("lane") as batch:
        batch.drop_column("backoff_cap_s")
        batch.drop_column("backoff_base_s")
        batch.drop_column("max_attempts")
    op.drop_index("ix_task_finished", table_name="task")
    op.drop_index("ux_task_dedupe", table_name="task")
    with op.batch_alter_table("task") as batch:
        batch.drop_constraint("ck_task_status", type_="check")
        batch.create_check_constraint("ck_task_status", _STATUSES_0005)
        batch.drop_column("dedupe_key")
        batch.drop_column("not_before")
