"""PostgreSQL: a lane's claims run side by side, each in a slot of its own (issue 13).

Until now every claim of a lane took the lane's claim lock (an exclusive advisory lock)
and held it to its commit, so a lane's claims -- and their commits' WAL flushes -- took
turns: eight workers on one lane waited on that lock most of the time
(docs/benchmarks.md). The lock kept ``max_in_flight``: a claim counted the live leases
after every earlier claim had committed.

Now a lane has ``max_in_flight`` slots, numbered from 0, and a lease records the slot it
holds (``task.lease_slot``, new here). A claim takes the lane's claim lock *shared*, and
for each lease it grants a slot lock of its own (an advisory lock on the lane and slot
number); after the slot lock it checks, in a fresh snapshot, that no live lease holds
that slot. Two claims never grant into one slot, every slot is below ``max_in_flight``,
so a lane holds at most ``max_in_flight`` live leases -- and claims of one lane no longer
wait on each other.

- Slot locks are tried (``pg_try_advisory_xact_lock``) in the worker's order: the slot
  of the lease it just completed first (``p_prefer``, from ``autonomy_complete``), else
  one picked by the worker's name. When every free slot is being claimed by another
  claim, the claim waits on such a slot -- only on slots above every slot lock it holds,
  so two claims never wait on each other.
- A worker's claims take a lock of their own (the worker in its lane), so its own-lease
  check (one claim per worker) still sees its earlier claim.
- Leases outside the slots -- granted before this migration (no slot), or above a
  ``max_in_flight`` lowered since -- are counted the old way: while the lane has one, a
  claim takes the lane's claim lock *exclusively*, waits for the slot claims in flight,
  counts every live lease and grants into free slots. A ``max_in_flight`` lowered while a
  claim runs applies from the next claim, as before (configure never took the claim
  lock): that claim sees the leases above the new limit and takes the exclusive path.
- A claim that finds every slot it could take granted by another claim meanwhile
  answers the lane's soonest lease, as a full lane does (the worker backs off a step).
- Everything else is 0004's: the pause check, expired leases requeued (``SKIP LOCKED``),
  the events, the rows answered.

SQLite has no such locks and needs none: its claim holds the database's write lock
(``BEGIN IMMEDIATE``) and writes no slot.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_v3 = importlib.import_module("app.storage.migrations.versions.0003_claim_function")
_v4 = importlib.import_module("app.storage.migrations.versions.0004_complete_and_claim")

LANE_LOCK = _v3.CLAIM_LOCK_CLASS  # 'auto': the lane's claim lock (shared / exclusive)
SLOT_LOCK = 1635087475  # 'aut3': a slot of a lane (key: hashtext(lane) # slot)
WORKER_LOCK = 1635087479  # 'aut7': a worker's claims in a lane

# 0004's requeue of the lane's expired leases (only when one exists, SKIP LOCKED), as is
_REQUEUE = _v4.CLAIM_FUNCTION[
    _v4.CLAIM_FUNCTION.index("    IF EXISTS (SELECT 1 FROM task t WHERE t.assignee"):
    _v4.CLAIM_FUNCTION.index("    END IF;\n\n    SELECT count(*)") + len("    END IF;\n")]

_LIVE = """t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > p_now"""

CLAIM_FUNCTION = f"""
CREATE OR REPLACE FUNCTION autonomy_claim(
    p_assignee text, p_worker text, p_tokens text[], p_now timestamptz,
    p_expires timestamptz, p_expires_iso text, p_prefer integer DEFAULT NULL)
RETURNS TABLE (outcome text, row_json json)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_lane lane%ROWTYPE;
    v_max integer;
    v_live integer;
    v_mine integer;
    v_outside boolean;
    v_taken integer[];
    v_room integer;
    v_key integer;
    v_start bigint;
    v_slot integer;
    v_got integer[] := '{{}}';
    v_busy integer[] := '{{}}';
    v_top integer := -1;
BEGIN
    PERFORM pg_advisory_xact_lock({WORKER_LOCK}, hashtext(p_assignee || '/' || p_worker));
    SELECT * INTO v_lane FROM lane WHERE lane.assignee = p_assignee;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_lane.paused THEN
        RETURN QUERY SELECT 'paused'::text, to_json(v_lane);
        RETURN;
    END IF;
    RETURN QUERY SELECT 'lane'::text, to_json(v_lane);
    v_max := v_lane.max_in_flight;
    v_key := hashtext(p_assignee);

{_REQUEUE}
    SELECT count(*), count(*) FILTER (WHERE t.claimed_by = p_worker),
           coalesce(bool_or(t.lease_slot IS NULL OR t.lease_slot >= v_max), false),
           coalesce(array_agg(t.lease_slot) FILTER (WHERE t.lease_slot IS NOT NULL), '{{}}')
    INTO v_live, v_mine, v_outside, v_taken FROM task t WHERE {_LIVE};
    IF v_mine > 0 THEN
        RETURN QUERY SELECT 'held'::text, to_json(t) FROM task t
            WHERE {_LIVE} AND t.claimed_by = p_worker
            ORDER BY t.lease_expires_at LIMIT 1;
        RETURN;
    END IF;
    IF v_live < v_max THEN
        IF v_outside THEN
            -- leases outside the slots: count them all with every slot claim excluded
            PERFORM pg_advisory_xact_lock({LANE_LOCK}, v_key);
            SELECT count(*), coalesce(array_agg(t.lease_slot)
                                      FILTER (WHERE t.lease_slot IS NOT NULL), '{{}}')
            INTO v_live, v_taken FROM task t WHERE {_LIVE};
            v_room := least(v_max - v_live, cardinality(p_tokens));
            IF v_room > 0 THEN
                SELECT coalesce(array_agg(s), '{{}}') INTO v_got FROM (
                    SELECT s FROM generate_series(0, v_max - 1) AS s
                    WHERE s <> ALL (v_taken) ORDER BY s LIMIT v_room) free;
            END IF;
        ELSE
            PERFORM pg_advisory_xact_lock_shared({LANE_LOCK}, v_key);
            v_room := least(v_max - v_live, cardinality(p_tokens));
            v_start := coalesce(p_prefer, abs(hashtext(p_worker)::bigint));
            FOR i IN 0 .. v_max - 1 LOOP
                EXIT WHEN cardinality(v_got) >= v_room;
                v_slot := (v_start + i) % v_max;
                CONTINUE WHEN v_slot = ANY (v_taken);
                IF pg_try_advisory_xact_lock({SLOT_LOCK}, v_key # v_slot) THEN
                    v_top := greatest(v_top, v_slot);
                    IF NOT EXISTS (SELECT 1 FROM task t
                                   WHERE {_LIVE} AND t.lease_slot = v_slot) THEN
                        v_got := v_got || v_slot;
                    END IF;
                ELSE
                    v_busy := v_busy || v_slot;
                END IF;
            END LOOP;
            -- every free slot was being claimed: wait for one, never below a slot held
            IF cardinality(v_got) < v_room AND cardinality(v_busy) > 0 THEN
                FOR v_slot IN SELECT b FROM unnest(v_busy) AS b ORDER BY b LOOP
                    EXIT WHEN cardinality(v_got) >= v_room;
                    CONTINUE WHEN v_slot <= v_top;
                    PERFORM pg_advisory_xact_lock({SLOT_LOCK}, v_key # v_slot);
                    v_top := v_slot;
                    IF NOT EXISTS (SELECT 1 FROM task t
                                   WHERE {_LIVE} AND t.lease_slot = v_slot) THEN
                        v_got := v_got || v_slot;
                    END IF;
                END LOOP;
            END IF;
        END IF;
    END IF;
    IF cardinality(v_got) = 0 THEN
        RETURN QUERY SELECT 'held'::text, to_json(t) FROM task t WHERE {_LIVE}
            ORDER BY t.lease_expires_at LIMIT 1;
        RETURN;
    END IF;

    RETURN QUERY
    WITH pick AS (
        SELECT s.id, row_number() OVER () AS n FROM (
            SELECT t.id FROM task t
            WHERE t.assignee = p_assignee AND t.status = 'todo'
            ORDER BY t.priority DESC, t.created_at, t.id
            LIMIT cardinality(v_got)
            FOR UPDATE SKIP LOCKED
        ) s
    ), granted AS (
        UPDATE task t SET status = 'in_progress', claimed_by = p_worker,
            lease_token = p_tokens[pick.n], lease_expires_at = p_expires,
            lease_slot = v_got[pick.n], updated_at = p_now
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

COMPLETE_FUNCTION = _v4.COMPLETE_FUNCTION.replace(
    "p_assignee, p_worker, p_tokens, p_now, p_expires, p_expires_iso) AS c;",
    "p_assignee, p_worker, p_tokens, p_now, p_expires, p_expires_iso,\n"
    "            v_done.lease_slot) AS c;")
assert COMPLETE_FUNCTION != _v4.COMPLETE_FUNCTION

_OLD_CLAIM = "autonomy_claim(text, text, text[], timestamptz, timestamptz, text)"
_NEW_CLAIM = "autonomy_claim(text, text, text[], timestamptz, timestamptz, text, integer)"


def upgrade() -> None:
    op.add_column("task", sa.Column("lease_slot", sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_OLD_CLAIM}")
        op.execute(CLAIM_FUNCTION)
        op.execute(COMPLETE_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_NEW_CLAIM}")
        op.execute(_v4.CLAIM_FUNCTION)
        op.execute(_v4.COMPLETE_FUNCTION)
    with op.batch_alter_table("task") as batch:
        batch.drop_column("lease_slot")
