-- offload's PostgreSQL schema, version 2: a single send skips the batch machinery.
--
-- v1's enqueue handles any batch with set-based statements over unnest(...) WITH ORDINALITY
-- (idempotency keys resolved within the batch and against the table, a bound check per queue).
-- For the most common call, one job without an idempotency key, that costs ~90 µs of server
-- time; the same work in scalar statements costs ~45 µs (PostgreSQL 15, 2-core dev machine,
-- 1,000 calls in a DO loop). v1's function stays, renamed enqueue_batch; enqueue answers the
-- single keyless job itself and hands everything else to it. Both keep v1's contract (see v1.sql).

ALTER FUNCTION {s}.enqueue(text[], text[], text[], integer[], float8[], float8[], float8[],
                           integer[], float8[], text[], float8[], bytea[])
    RENAME TO enqueue_batch;

CREATE FUNCTION {s}.enqueue(
    p_id text[], p_queue text[], p_task text[], p_priority integer[], p_eta float8[],
    p_created float8[], p_lease float8[], p_max_deliveries integer[], p_result_ttl float8[],
    p_key text[], p_window float8[], p_body bytea[]
) RETURNS TABLE (o_job_id text, o_created boolean, o_full_queue text, o_depth bigint,
                 o_max_depth integer, o_drain_rate float8)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_now timestamptz := now();
    v_bound integer;
    v_depth bigint;
BEGIN
    IF cardinality(p_id) <> 1 OR p_key[1] IS NOT NULL THEN
        RETURN QUERY SELECT * FROM {s}.enqueue_batch(p_id, p_queue, p_task, p_priority, p_eta,
            p_created, p_lease, p_max_deliveries, p_result_ttl, p_key, p_window, p_body);
        RETURN;
    END IF;

    -- The bound, as in v1: a bounded queue's row is locked, so enqueues into it take turns.
    SELECT q.max_depth INTO v_bound FROM {s}.queues q
    WHERE q.name = p_queue[1] AND q.max_depth IS NOT NULL
    FOR UPDATE;
    IF v_bound IS NOT NULL THEN
        SELECT coalesce(sum(c.queued), 0) INTO v_depth FROM {s}.queue_counts c WHERE c.queue = p_queue[1];
        IF v_depth + 1 > v_bound THEN
            RETURN QUERY SELECT NULL::text, false, p_queue[1], v_depth, v_bound, {s}.drain_rate(p_queue[1]);
            RETURN;
        END IF;
    END IF;

    INSERT INTO {s}.jobs (id, queue, task, state, priority, run_at, created_at, lease_seconds,
                          max_deliveries, result_ttl, idempotency_key, body)
    VALUES (p_id[1], p_queue[1], p_task[1], 'queued', p_priority[1],
            CASE WHEN p_eta[1] IS NULL THEN v_now ELSE greatest(v_now, to_timestamp(p_eta[1])) END,
            CASE WHEN p_created[1] > 0 THEN to_timestamp(p_created[1]) ELSE v_now END,
            p_lease[1], p_max_deliveries[1], p_result_ttl[1], NULL, p_body[1])
    ON CONFLICT (id) DO NOTHING;  -- a retried call whose first attempt committed

    PERFORM pg_notify('{channel}', p_queue[1]);
    RETURN QUERY SELECT p_id[1], true, NULL::text, NULL::bigint, NULL::integer, NULL::float8;
END $fn$;
