"""One clock (SPEC 4.9, issue 19 item 1): the database's time decides, never a caller's.

Until now ``autonomy_claim`` and ``autonomy_complete`` took the time from their caller
(``p_now``, ``p_expires``): a worker whose clock ran 10 minutes ahead requeued every
honest lease as expired and ran its tasks again; one 10 minutes behind granted leases
that had expired before they were granted. The new versions read the database's clock
themselves (``clock_timestamp()``, once the worker's lock is held) and grant leases of
``p_ttl_s`` seconds from it; the claim answers that time first (``('clock', time)``), so
a caller learns the database's time in the same round trip. ``p_test_now`` (NULL in
production) lets a test with an injected clock decide the time instead.

Both functions are written out whole in the ``.sql`` files beside this migration (the
house rule: never assembled from an earlier migration's text). Their signatures change,
so upgrade drops 0006's versions first and downgrade drops these and restores 0006's.
No table changes; SQLite has no functions (its statements read SQLite's own clock:
``app/storage/store.py``'s ``db_now``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import importlib
from pathlib import Path

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_HERE = Path(__file__).resolve().parent
CLAIM_FUNCTION = (_HERE / "0009_one_clock_claim.sql").read_text(encoding="utf-8")
COMPLETE_FUNCTION = (_HERE / "0009_one_clock_complete.sql").read_text(encoding="utf-8")

_OLD_CLAIM = ("autonomy_claim(text, text, text[], timestamptz, timestamptz, text, integer)")
_OLD_COMPLETE = ("autonomy_complete(bigint, text, timestamptz, json, text, text, text, "
                 "text[], timestamptz, text)")
_NEW_CLAIM = "autonomy_claim(text, text, text[], double precision, timestamptz, integer)"
_NEW_COMPLETE = ("autonomy_complete(bigint, text, json, text, text, text, text[], "
                 "double precision, timestamptz)")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_OLD_COMPLETE}")
        op.execute(f"DROP FUNCTION IF EXISTS {_OLD_CLAIM}")
        op.execute(CLAIM_FUNCTION)
        op.execute(COMPLETE_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        v6 = importlib.import_module("app.storage.migrations.versions.0006_task_lifecycle")
        op.execute(f"DROP FUNCTION IF EXISTS {_NEW_COMPLETE}")
        op.execute(f"DROP FUNCTION IF EXISTS {_NEW_CLAIM}")
        op.execute(v6.CLAIM_FUNCTION)
        op.execute(v6.COMPLETE_FUNCTION)
