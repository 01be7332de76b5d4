-- autonomy_claim, version 0010 (batched grants, issue 22): 0009's function with one
-- change -- a worker may hold as many leases in a lane as the tokens it passes
-- (cardinality(p_tokens), its prefetch K): it is refused ('held') only once it holds K
-- live leases, and granted at most K less those it holds, each a lease of its own (its
-- token, its slot, its event), all within max_in_flight as before. With one token (every
-- claim before this version) that is 0009's rule exactly: one lease per worker per lane.
-- Everything else is 0009's: the one clock, the worker lock, the pause check, the lane
-- slots that keep max_in_flight exact, the events.
-- Lock classes: 1635087471 'auto' (the lane's claim lock), 1635087475 'aut3' (a slot of
-- a lane), 1635087479 'aut7' (a worker's claims in a lane).
CREATE OR REPLACE FUNCTION autonomy_claim(
    p_assignee text, p_worker text, p_tokens text[], p_ttl_s double precision,
    p_test_now timestamptz DEFAULT NULL, p_prefer integer DEFAULT NULL)
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
    v_got integer[] := '{}';
    v_busy integer[] := '{}';
    v_top integer := -1;
    v_now timestamptz;
    v_expires timestamptz;
    v_expires_iso text;
BEGIN
    PERFORM pg_advisory_xact_lock(1635087479, hashtext(p_assignee || '/' || p_worker));
    -- the one clock (SPEC 4.9): read once the worker's lock is held, so a claim that
    -- waited for it decides by the time it runs, not the time it was sent
    v_now := coalesce(p_test_now, clock_timestamp());
    v_expires := v_now + make_interval(secs => p_ttl_s);
    v_expires_iso := to_char(v_expires AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    RETURN QUERY SELECT 'clock'::text, to_json(v_now);
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

    IF EXISTS (SELECT 1 FROM task t WHERE t.assignee = p_assignee
               AND t.status = 'in_progress' AND t.lease_expires_at <= v_now) THEN
    RETURN QUERY
    WITH old AS (
        SELECT t.id, t.claimed_by, t.lease_token, t.lease_expires_at FROM task t
        WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at <= v_now
        FOR UPDATE SKIP LOCKED
    ), back AS (
        UPDATE task t SET status = 'todo', claimed_by = NULL, lease_token = NULL,
            lease_expires_at = NULL, updated_at = v_now
        FROM old WHERE t.id = old.id AND t.status = 'in_progress'
        RETURNING t.id, old.claimed_by, old.lease_token, old.lease_expires_at
    ), ev AS (
        INSERT INTO event (at, kind, assignee, task_id, actor, reason, data)
        SELECT v_now, 'lease_requeued', p_assignee, back.id, 'claim:' || p_worker,
               'lease expired',
               json_build_object('claimedBy', back.claimed_by,
                                 'leaseExpiresAt', to_char(back.lease_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        FROM back
    )
    SELECT 'requeued'::text, json_build_object('id', back.id, 'assignee', p_assignee,
                                               'claimed_by', back.claimed_by,
                                               'lease_token', back.lease_token)
    FROM back;

    END IF;

    SELECT count(*), count(*) FILTER (WHERE t.claimed_by = p_worker),
           coalesce(bool_or(t.lease_slot IS NULL OR t.lease_slot >= v_max), false),
           coalesce(array_agg(t.lease_slot) FILTER (WHERE t.lease_slot IS NOT NULL), '{}')
    INTO v_live, v_mine, v_outside, v_taken FROM task t WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > v_now;
    IF v_mine >= cardinality(p_tokens) THEN
        RETURN QUERY SELECT 'held'::text, to_json(t) FROM task t
            WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > v_now AND t.claimed_by = p_worker
            ORDER BY t.lease_expires_at LIMIT 1;
        RETURN;
    END IF;
    IF v_live < v_max THEN
        IF v_outside THEN
            -- leases outside the slots: count them all with every slot claim excluded
            PERFORM pg_advisory_xact_lock(1635087471, v_key);
            SELECT count(*), coalesce(array_agg(t.lease_slot)
                                      FILTER (WHERE t.lease_slot IS NOT NULL), '{}')
            INTO v_live, v_taken FROM task t WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > v_now;
            v_room := least(v_max - v_live, cardinality(p_tokens) - v_mine);
            IF v_room > 0 THEN
                SELECT coalesce(array_agg(s), '{}') INTO v_got FROM (
                    SELECT s FROM generate_series(0, v_max - 1) AS s
                    WHERE s <> ALL (v_taken) ORDER BY s LIMIT v_room) free;
            END IF;
        ELSE
            PERFORM pg_advisory_xact_lock_shared(1635087471, v_key);
            v_room := least(v_max - v_live, cardinality(p_tokens) - v_mine);
            v_start := coalesce(p_prefer, abs(hashtext(p_worker)::bigint));
            FOR i IN 0 .. v_max - 1 LOOP
                EXIT WHEN cardinality(v_got) >= v_room;
                v_slot := (v_start + i) % v_max;
                CONTINUE WHEN v_slot = ANY (v_taken);
                IF pg_try_advisory_xact_lock(1635087475, v_key # v_slot) THEN
                    v_top := greatest(v_top, v_slot);
                    IF NOT EXISTS (SELECT 1 FROM task t
                                   WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > v_now AND t.lease_slot = v_slot) THEN
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
                    PERFORM pg_advisory_xact_lock(1635087475, v_key # v_slot);
                    v_top := v_slot;
                    IF NOT EXISTS (SELECT 1 FROM task t
                                   WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > v_now AND t.lease_slot = v_slot) THEN
                        v_got := v_got || v_slot;
                    END IF;
                END LOOP;
            END IF;
        END IF;
    END IF;
    IF cardinality(v_got) = 0 THEN
        RETURN QUERY SELECT 'held'::text, to_json(t) FROM task t WHERE t.assignee = p_assignee AND t.status = 'in_progress'
          AND t.lease_expires_at > v_now
            ORDER BY t.lease_expires_at LIMIT 1;
        RETURN;
    END IF;

    RETURN QUERY
    WITH pick AS (
        SELECT s.id, row_number() OVER () AS n FROM (
            SELECT t.id FROM task t
            WHERE t.assignee = p_assignee AND t.status = 'todo'
              AND (t.not_before IS NULL OR t.not_before <= v_now)
            ORDER BY t.priority DESC, t.created_at, t.id
            LIMIT cardinality(v_got)
            FOR UPDATE SKIP LOCKED
        ) s
    ), granted AS (
        UPDATE task t SET status = 'in_progress', claimed_by = p_worker,
            lease_token = p_tokens[pick.n], lease_expires_at = v_expires,
            lease_slot = v_got[pick.n], updated_at = v_now
        FROM pick WHERE t.id = pick.id
        RETURNING t.*
    ), ev AS (
        INSERT INTO event (at, kind, assignee, task_id, actor, data)
        SELECT v_now, 'lease_granted', p_assignee, granted.id, p_worker,
               json_build_object('expiresAt', v_expires_iso)
        FROM granted
    )
    SELECT 'granted'::text, to_json(granted) FROM granted;
END
$fn$
