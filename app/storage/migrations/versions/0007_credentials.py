"""Credentials with scopes (issue 20, SPEC 4.10): the ``credential`` table and the
deployment's hashing key.

- ``credential``: one row per credential ``autonomy token create`` minted: its name, its
  scope (``operator``, ``worker``, ``read``), a worker credential's lanes and worker name
  or name prefix, the HMAC-SHA256 of its secret (never the secret), who made it and when,
  and when and by whom it was revoked. A name is unique among the credentials not
  revoked (a partial unique index), so ``token rotate`` can mint the name again.
- ``credential_key``: one row, the random key the secrets are hashed with (HMAC), made
  here so every API process and the CLI hash alike without configuring anything.

Self-contained: it creates two new tables and touches nothing else (it was written beside
0006, the task lifecycle, then chained after it).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import secrets

import sqlalchemy as sa
from alembic import op

from app.storage.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credential",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("lanes", sa.JSON(), nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("worker_prefix", sa.String(128), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(128), nullable=True),
        sa.CheckConstraint("scope in ('operator','worker','read')", name="ck_credential_scope"),
    )
    op.create_index("ix_credential_secret_hash", "credential", ["secret_hash"], unique=True)
    op.create_index("ix_credential_active_name", "credential", ["name"], unique=True,
                    postgresql_where=sa.text("revoked_at IS NULL"),
                    sqlite_where=sa.text("revoked_at IS NULL"))
    key = op.create_table(
        "credential_key",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
    )
    op.bulk_insert(key, [{"id": 1, "key": secrets.token_hex(32)}])


def downgrade() -> None:
    op.drop_table("credential_key")
    op.drop_index("ix_credential_active_name", table_name="credential")
    op.drop_index("ix_credential_secret_hash", table_name="credential")
    op.drop_table("credential")
