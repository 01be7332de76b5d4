"""PostgreSQL: a complete that also claims the worker's next task, in one statement
(issue 13).

``autonomy_complete(task_id, token, now, result, actor, assignee, worker, tokens[],
expires, expires_iso)`` marks a leased task done under its token and writes its
``task_completed`` event (a ``done`` row); nothing when the lease is not live under that
token (the caller's full path then answers the guard or the refusal). When ``worker`` is
given and is the lease's holder in ``assignee``, it then runs ``autonomy_claim`` for that
worker in the same transaction, so a worker's cycle is one round trip and one commit: the
claim's rows follow the ``done`` row.

``autonomy_claim`` changes in three places (same answers, less work per call):

- the expired leases it requeues are locked ``SKIP LOCKED``. A lease being completed,
  heartbeated or requeued by someone else right now is theirs to settle (the next claim
  requeues it if it is still expired), so a claim never waits on a row lock while it
  holds its lane's claim lock -- and a complete that holds its task's row lock while it
  waits for the lane's claim lock cannot deadlock with it;
- that requeue statement runs only when an expired lease exists (one index probe);
- the worker's own lease and the lane's live leases are counted in one statement.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

import importlib

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_v3 = importlib.import_module("app.storage.migrations.versions.0003_claim_function")


def _claim_function() -> str:
    """0003's ``autonomy_claim`` with the three changes above."""
    f = _v3.CLAIM_FUNCTION
    requeue_at, held_at = f.index("    RETURN QUERY\n    WITH old AS ("), \
        f.index("    SELECT to_json(t) INTO v_held")
    room_at = f.index("    IF v_live >= v_lane.max_in_flight")
    requeue = f[requeue_at:held_at].replace(
        "          AND t.lease_expires_at <= p_now\n        FOR UPDATE\n",
        "          AND t.lease_expires_at <= p_now\n        FOR UPDATE SKIP LOCKED\n")
    assert "SKIP LOCKED" in requeue
    out = f[:requeue_at] + _ANY_EXPIRED + requeue + "    END IF;\n\n" + _LIVE + f[room_at:]
    return out.replace("    v_held json;\n", "    v_mine integer;\n")


# the requeue statement runs only when there is something to requeue
_ANY_EXPIRED = """    IF EXISTS (SELECT 1 FROM task t WHERE t.assignee = p_assignee
               AND t.status = 'in_progress' AND t.lease_expires_at <= p_now) THEN
"""
# the live leases counted once: how many, and how many are the worker's own
_LIVE = """    SELECT count(*), count(*) FILTER (WHERE t.claimed_by = p_worker)
    INTO v_live, v_mine FROM task t
    WHERE t.assignee = p_assignee AND t.status = 'in_progress'
      AND t.lease_expires_at > p_now;
    IF v_mine > 0 THEN
        RETURN QUERY SELECT 'held'::text, to_json(t) FROM task t
            WHERE t.assignee = p_assignee AND t.status = 'in_progress'
              AND t.lease_expires_at > p_now AND t.claimed_by = p_worker
            ORDER BY t.lease_expires_at LIMIT 1;
        RETURN;
    END IF;
"""
CLAIM_FUNCTION = _claim_function()

COMPLETE_FUNCTION = """
CREATE OR REPLACE FUNCTION autonomy_complete(
    p_task_id bigint, p_token text, p_now timestamptz, p_result json, p_actor text,
    p_assignee text, p_worker text, p_tokens text[], p_expires timestamptz,
    p_expires_iso text)
RETURNS TABLE (outcome text, row_json json)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_done task%ROWTYPE;
BEGIN
    UPDATE task SET status = 'done', completed_at = p_now, updated_at = p_now,
        lease_expires_at = NULL, result = p_result
    WHERE id = p_task_id AND status = 'in_progress' AND lease_token = p_token
    RETURNING * INTO v_done;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO event (at, kind, assignee, task_id, actor, data)
    VALUES (p_now, 'task_completed', v_done.assignee, v_done.id,
            coalesce(p_actor, v_done.claimed_by), '{}'::json);
    RETURN QUERY SELECT 'done'::text, to_json(v_done);
    IF p_worker IS NOT NULL AND v_done.claimed_by = p_worker
            AND v_done.assignee = p_assignee THEN
        RETURN QUERY SELECT c.outcome, c.row_json FROM autonomy_claim(
            p_assignee, p_worker, p_tokens, p_now, p_expires, p_expires_iso) AS c;
    END IF;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CLAIM_FUNCTION)
        op.execute(COMPLETE_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS autonomy_complete(bigint, text, timestamptz, "
                   "json, text, text, text, text[], timestamptz, text)")
        op.execute(_v3.CLAIM_FUNCTION)
