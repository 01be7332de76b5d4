"""The deployment a database belongs to (SPEC 4.12, issue 19).

One row (``id`` is always 1): the identity of the Redis the deployment uses
(``host:port/db``, never the password; see ``app.ops.deployment``), its key prefix, and
when and by which process it was bound. The first process of a deployment to start binds
an unbound database; a process pointed at the database with another Redis or prefix is
refused at start, so two stacks never run two beat leaders and two sets of run-locks over
one fleet. ``autonomy db bind-deployment --force`` re-binds it.

Self-contained: it creates and drops only its own table and reads nothing of the
migrations before it (it was written beside 0006 and 0007, then chained after them).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("redis_identity", sa.String(500), nullable=False),
        sa.Column("redis_prefix", sa.String(200), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bound_by", sa.String(300), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_deployment_one_row"),
    )


def downgrade() -> None:
    op.drop_table("deployment")
