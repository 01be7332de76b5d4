-- autonomy_complete, version 0006 (task lifecycle): the same behaviour as 0005's,
-- written out whole here so this migration holds both functions readable as they run.
-- A cancelled task is no longer in_progress, so its holder's complete matches nothing
-- here and the caller's full path answers task_cancelled.
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
            p_assignee, p_worker, p_tokens, p_now, p_expires, p_expires_iso,
            v_done.lease_slot) AS c;
    END IF;
END
$fn$
