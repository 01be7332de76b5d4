"""Batched grants and completes (issue 22 item 1): a worker may hold a prefetch of K
leases in a lane, and finish several tasks in one statement.

``autonomy_claim`` (0010) counts a worker's live leases against the number of tokens it
passes (its prefetch K) instead of refusing any second lease: with one token -- every
claim made before -- the rule is 0009's exactly. ``autonomy_complete_many`` (new) marks
several leased tasks done, each fenced by its own token and with its own
``task_completed`` event, in one statement and one commit, and hands over up to K next
leases through ``autonomy_claim``.

Both functions are written out whole in the ``.sql`` files beside this migration. The
claim's signature is 0009's (``CREATE OR REPLACE``); downgrade restores 0009's claim and
drops the new function. No table changes; SQLite has no functions (``app/ops/batch.py``
runs the same rules in one transaction).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

import importlib
from pathlib import Path

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_HERE = Path(__file__).resolve().parent
CLAIM_FUNCTION = (_HERE / "0010_batch_claim.sql").read_text(encoding="utf-8")
COMPLETE_MANY_FUNCTION = (_HERE / "0010_batch_complete_many.sql").read_text(encoding="utf-8")

_COMPLETE_MANY = ("autonomy_complete_many(bigint[], text[], json[], text, text, text, "
                  "text[], double precision, timestamptz)")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CLAIM_FUNCTION)
        op.execute(COMPLETE_MANY_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        v9 = importlib.import_module("app.storage.migrations.versions.0009_one_clock")
        op.execute(f"DROP FUNCTION IF EXISTS {_COMPLETE_MANY}")
        op.execute(v9.CLAIM_FUNCTION)
