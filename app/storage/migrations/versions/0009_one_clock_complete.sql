-- autonomy_complete, version 0009 (one clock, SPEC 4.9): 0006's behaviour with the
-- database's time (clock_timestamp()) as the completion time instead of the caller's;
-- the claim that follows (p_worker set) is 0009's autonomy_claim, which reads the clock
-- itself and answers it first ('clock'). p_test_now is NULL in production (a test's
-- injected clock otherwise, passed on to the claim). A cancelled task is no longer
-- in_progress, so its holder's complete matches nothing here and the caller's full path
-- answers task_cancelled.
CREATE OR REPLACE FUNCTION autonomy_complete(
    p_task_id bigint, p_token text, p_result json, p_actor text,
    p_assignee text, p_worker text, p_tokens text[], p_ttl_s double precision,
    p_test_now timestamptz DEFAULT NULL)
RETURNS TABLE (outcome text, row_json json)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_done task%ROWTYPE;
    v_now timestamptz := coalesce(p_test_now, clock_timestamp());
BEGIN
    UPDATE task SET status = 'done', completed_at = v_now, updated_at = v_now,
        lease_expires_at = NULL, result = p_result
    WHERE id = p_task_id AND status = 'in_progress' AND lease_token = p_token
    RETURNING * INTO v_done;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO event (at, kind, assignee, task_id, actor, data)
    VALUES (v_now, 'task_completed', v_done.assignee, v_done.id,
            coalesce(p_actor, v_done.claimed_by), '{}'::json);
    RETURN QUERY SELECT 'done'::text, to_json(v_done);
    IF p_worker IS NOT NULL AND v_done.claimed_by = p_worker
            AND v_done.assignee = p_assignee THEN
        RETURN QUERY SELECT c.outcome, c.row_json FROM autonomy_claim(
            p_assignee, p_worker, p_tokens, p_ttl_s, p_test_now, v_done.lease_slot) AS c;
    END IF;
END
$fn$
