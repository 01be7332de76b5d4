"""PostgreSQL: a claim in one statement (issue 13).

``autonomy_claim(assignee, worker, tokens[], now, expires, expires_iso)`` does on the
server what a claim did in six round trips and a lane row lock held across them:

1. takes the lane's claim lock -- a transaction-scoped advisory lock on the lane's name,
   so claims of one lane take turns while nothing else (pause, configure, completes) waits
   on the lane row; held for the function's own run only, never across a round trip;
2. reads the lane (missing: no rows; paused: one ``paused`` row with the lane; else a
   ``lane`` row);
3. puts the lane's expired leases back to ``todo``, each with its ``lease_requeued``
   event (``requeued`` rows carry the old holder and token, for Redis);
4. answers the worker's own live lease, or the lane's soonest-expiring one when the lane
   is full (``held`` row) -- the duplicate-claim guard;
5. otherwise leases up to ``min(len(tokens), max_in_flight - live)`` of the lane's next
   tasks (``FOR UPDATE SKIP LOCKED``, claim order), each with its ``lease_granted`` event
   (``granted`` rows).

The function is VOLATILE, so each statement in it reads a fresh snapshot taken after the
lock: a claim sees every lease granted by the claims before it. Rows come back as
``(outcome, json)``. SQLite has no such function: it runs the same steps in a
``BEGIN IMMEDIATE`` transaction (``app/storage/store.py``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# the advisory lock's first key: 'auto' in ASCII, so autonomy's lane locks have a class
# of their own among the database's advisory locks
CLAIM_LOCK_CLASS = 1635087471

ISO = """to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

CLAIM_FUNCTION = f"""
CREATE OR REPLACE FUNCTION autonomy_claim(
    p_assignee text, p_worker text, p_tokens text[], p_now timestamptz,
    p_expires timestamptz, p_expires_iso text)
RETURNS TABLE (outcome text, row_json json)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_lane lane%ROWTYPE;
    v_live integer;
    v_room integer;
    v_held json;
BEGIN
    PERFORM pg_advisory_xact_lock({CLAIM_LOCK_CLASS}, hashtext(p_assignee));
    SELECT * INTO v_lane FROM lane WHERE lane.assignee = p_assignee;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_lane.paused THEN
        RETURN QUERY SELECT 'paused'::text, to_json(v_lane);
        RETURN;
    END IF;
    RETURN QUERY SELECT 'lane'::text, to_json(v_lane);

    RETURN QUERY
    WITH old AS (
        SELECT t.id, t.claimed_by, t.lease_token, t.lease_expires_at FROM task t
        WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at <= p_now
        FOR UPDATE
    ), back AS (
        UPDATE task t SET status = 'todo', claimed_by = NULL, lease_token = NULL,
            lease_expires_at = NULL, updated_at = p_now
        FROM old WHERE t.id = old.id AND t.status = 'in_progress'
        RETURNING t.id, old.claimed_by, old.lease_token, old.lease_expires_at
    ), ev AS (
        INSERT INTO event (at, kind, assignee, task_id, actor, reason, data)
        SELECT p_now, 'lease_requeued', p_assignee, back.id, 'claim:' || p_worker,
               'lease expired',
               json_build_object('claimedBy', back.claimed_by,
                                 'leaseExpiresAt', {ISO.format('back.lease_expires_at')})
        FROM back
    )
    SELECT 'requeued'::text, json_build_object('id', back.id, 'assignee', p_assignee,
                                               'claimed_by', back.claimed_by,
                                               'lease_token', back.lease_token)
    FROM back;

    SELECT to_json(t) INTO v_held FROM task t
    WHERE t.assignee = p_assignee AND t.status = 'in_progress'
      AND t.lease_expires_at > p_now AND t.claimed_by = p_worker
    ORDER BY t.lease_expires_at LIMIT 1;
    IF v_held IS NOT NULL THEN
        RETURN QUERY SELECT 'held'::text, v_held;
        RETURN;
    END IF;
    SELECT count(*) INTO v_live FROM task t
    WHERE t.assignee = p_assignee AND t.status = 'in_progress'
      AND t.lease_expires_at > p_now;
    IF v_live >= v_lane.max_in_flight THEN
        RETURN QUERY SELECT 'held'::text, to_json(t) FROM task t
            WHERE t.assignee = p_assignee AND t.status = 'in_progress'
              AND t.lease_expires_at > p_now
            ORDER BY t.lease_expires_at LIMIT 1;
        RETURN;
    END IF;
    v_room := least(v_lane.max_in_flight - v_live, cardinality(p_tokens));

    RETURN QUERY
    WITH pick AS (
        SELECT s.id, row_number() OVER () AS n FROM (
            SELECT t.id FROM task t
            WHERE t.assignee = p_assignee AND t.status = 'todo'
            ORDER BY t.priority DESC, t.created_at, t.id
            LIMIT v_room
            FOR UPDATE SKIP LOCKED
        ) s
    ), granted AS (
        UPDATE task t SET status = 'in_progress', claimed_by = p_worker,
            lease_token = p_tokens[pick.n], lease_expires_at = p_expires, updated_at = p_now
        FROM pick WHERE t.id = pick.id
        RETURNING t.*
    ), ev AS (
        INSERT INTO event (at, kind, assignee, task_id, actor, data)
        SELECT p_now, 'lease_granted', p_assignee, granted.id, p_worker,
               json_build_object('expiresAt', p_expires_iso)
        FROM granted
    )
    SELECT 'granted'::text, to_json(granted) FROM granted;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CLAIM_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS autonomy_claim(text, text, text[], timestamptz, "
                   "timestamptz, text)")
