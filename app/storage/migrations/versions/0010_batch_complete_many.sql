-- autonomy_complete_many, new in 0010 (batched completes, issue 22): several leased tasks
-- finished with success in one statement and one transaction, each fenced by its own
-- token -- an item whose lease is not live under its token (stale, expired, released,
-- cancelled, already done) matches nothing and is left out of the answer (the caller's
-- full path then answers that item's guard or refusal, alone) -- each with its own
-- task_completed event, at the database's time (clock_timestamp(); p_test_now is a
-- test's injected clock, NULL in production). Then, when p_worker held at least one of
-- the completed leases in p_assignee and passes tokens (p_new_tokens, its prefetch K),
-- 0010's autonomy_claim hands over up to K next leases (counting those it still holds)
-- in the same transaction, preferring the slot of a lease just ended.
-- Answers ('done', row) per completed task, then the claim's rows when a claim was made.
CREATE OR REPLACE FUNCTION autonomy_complete_many(
    p_ids bigint[], p_tokens text[], p_results json[], p_actor text,
    p_assignee text, p_worker text, p_new_tokens text[], p_ttl_s double precision,
    p_test_now timestamptz DEFAULT NULL)
RETURNS TABLE (outcome text, row_json json)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_now timestamptz := coalesce(p_test_now, clock_timestamp());
    v_rows json[];
    v_mine integer;
    v_slot integer;
BEGIN
    WITH item AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_results) AS i(id, token, result)
    ), done AS (
        UPDATE task t SET status = 'done', completed_at = v_now, updated_at = v_now,
            lease_expires_at = NULL, result = item.result
        FROM item
        WHERE t.id = item.id AND t.status = 'in_progress' AND t.lease_token = item.token
        RETURNING t.*
    ), ev AS (
        INSERT INTO event (at, kind, assignee, task_id, actor, data)
        SELECT v_now, 'task_completed', done.assignee, done.id,
               coalesce(p_actor, done.claimed_by), '{}'::json
        FROM done
    )
    SELECT coalesce(array_agg(to_json(done) ORDER BY done.id), '{}'),
           count(*) FILTER (WHERE done.claimed_by = p_worker
                            AND done.assignee = p_assignee),
           min(done.lease_slot) FILTER (WHERE done.claimed_by = p_worker
                                        AND done.assignee = p_assignee)
    INTO v_rows, v_mine, v_slot FROM done;
    RETURN QUERY SELECT 'done'::text, r FROM unnest(v_rows) AS r;
    IF p_worker IS NOT NULL AND v_mine > 0 AND cardinality(p_new_tokens) > 0 THEN
        RETURN QUERY SELECT c.outcome, c.row_json FROM autonomy_claim(
            p_assignee, p_worker, p_new_tokens, p_ttl_s, p_test_now, v_slot) AS c;
    END IF;
END
$fn$
