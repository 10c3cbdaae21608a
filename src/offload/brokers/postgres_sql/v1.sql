-- offload's PostgreSQL schema, version 1. {s} is the schema, {channel} the NOTIFY channel,
-- {shards} the counter shards per queue (see postgres_schema.render). Never edit once shipped:
-- add a v2.sql and a MIGRATIONS entry instead.

CREATE TABLE {s}.queues (
    name text PRIMARY KEY,
    max_depth integer CHECK (max_depth IS NULL OR max_depth >= 0),  -- NULL: unbounded
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Jobs waiting (ready or delayed) per queue = sum over the queue's shards; kept by triggers.
CREATE TABLE {s}.queue_counts (
    queue text NOT NULL,
    shard smallint NOT NULL,
    queued bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
);

CREATE TABLE {s}.jobs (
    id text COLLATE "C" PRIMARY KEY,  -- time-sortable hex: FIFO tie-break within a batch
    queue text NOT NULL,
    task text NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')),
    priority integer NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL,          -- not delivered before
    created_at timestamptz NOT NULL,
    lease_seconds double precision NOT NULL,
    max_deliveries integer NOT NULL,
    result_ttl double precision NOT NULL,
    deliveries integer NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    token bigint NOT NULL DEFAULT 0,      -- fencing token of the current lease
    lease_expires_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    expires_at timestamptz,               -- succeeded/cancelled jobs are pruned after this
    worker text,
    idempotency_key text,
    body bytea NOT NULL,                  -- the JSON envelope
    result bytea,                         -- the JSON result
    error text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);

CREATE INDEX jobs_ready ON {s}.jobs (queue, priority DESC, run_at, id) WHERE state = 'queued';
CREATE INDEX jobs_due ON {s}.jobs (queue, run_at) WHERE state = 'queued';
CREATE INDEX jobs_leases ON {s}.jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_expiry ON {s}.jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX jobs_dead ON {s}.jobs (queue, finished_at) WHERE state = 'dead';

CREATE TABLE {s}.idempotency (
    key text PRIMARY KEY,
    job_id text COLLATE "C" NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX idempotency_expiry ON {s}.idempotency (expires_at);

-- Jobs finished per queue per second (sharded like queue_counts), for the drain rate.
CREATE TABLE {s}.throughput (
    queue text NOT NULL,
    second bigint NOT NULL,
    shard smallint NOT NULL,
    finished integer NOT NULL,
    PRIMARY KEY (queue, second, shard)
);

CREATE FUNCTION {s}.count_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {s}.queues (name) SELECT DISTINCT n.queue FROM new_rows n ORDER BY 1
    ON CONFLICT (name) DO NOTHING;
    INSERT INTO {s}.queue_counts AS c (queue, shard, queued)
    SELECT n.queue, (pg_backend_pid() % {shards})::smallint, count(*) FROM new_rows n
    WHERE n.state = 'queued' GROUP BY n.queue ORDER BY n.queue
    ON CONFLICT (queue, shard) DO UPDATE SET queued = c.queued + excluded.queued;
    RETURN NULL;
END $fn$;

CREATE FUNCTION {s}.count_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {s}.queue_counts AS c (queue, shard, queued)
    SELECT d.queue, (pg_backend_pid() % {shards})::smallint, sum(d.delta) FROM (
        SELECT n.queue, 1 AS delta FROM new_rows n WHERE n.state = 'queued'
        UNION ALL
        SELECT o.queue, -1 FROM old_rows o WHERE o.state = 'queued'
    ) d GROUP BY d.queue HAVING sum(d.delta) <> 0 ORDER BY d.queue
    ON CONFLICT (queue, shard) DO UPDATE SET queued = c.queued + excluded.queued;
    RETURN NULL;
END $fn$;

CREATE FUNCTION {s}.count_delete() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {s}.queue_counts AS c (queue, shard, queued)
    SELECT o.queue, (pg_backend_pid() % {shards})::smallint, -count(*) FROM old_rows o
    WHERE o.state = 'queued' GROUP BY o.queue ORDER BY o.queue
    ON CONFLICT (queue, shard) DO UPDATE SET queued = c.queued + excluded.queued;
    RETURN NULL;
END $fn$;

CREATE FUNCTION {s}.count_truncate() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    DELETE FROM {s}.queue_counts;
    RETURN NULL;
END $fn$;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON {s}.jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_insert();
CREATE TRIGGER jobs_count_update AFTER UPDATE ON {s}.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_update();
CREATE TRIGGER jobs_count_delete AFTER DELETE ON {s}.jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_delete();
CREATE TRIGGER jobs_count_truncate AFTER TRUNCATE ON {s}.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_truncate();

CREATE FUNCTION {s}.drain_rate(p_queue text) RETURNS double precision LANGUAGE sql STABLE AS $fn$
    SELECT CASE WHEN coalesce(sum(t.finished), 0) = 0 THEN 0.0::float8
        ELSE sum(t.finished)::float8
            / least(60.0, greatest(1.0, extract(epoch FROM now())::float8 - min(t.second)))::float8
        END
    FROM {s}.throughput t
    WHERE t.queue = p_queue AND t.second > floor(extract(epoch FROM now()))::bigint - 60
$fn$;

CREATE FUNCTION {s}.count_finished(p_queues text[], p_now timestamptz) RETURNS void
LANGUAGE sql AS $fn$
    INSERT INTO {s}.throughput AS t (queue, second, shard, finished)
    SELECT q, floor(extract(epoch FROM p_now))::bigint, (pg_backend_pid() % {shards})::smallint, count(*)
    FROM unnest(p_queues) AS q GROUP BY q ORDER BY q
    ON CONFLICT (queue, second, shard) DO UPDATE SET finished = t.finished + excluded.finished
$fn$;

-- Store jobs (all or nothing). One row per item: the job it names and whether it was created;
-- or, when a bounded queue would pass its bound, one row naming that queue (nothing written).
CREATE FUNCTION {s}.enqueue(
    p_id text[], p_queue text[], p_task text[], p_priority integer[], p_eta float8[],
    p_created float8[], p_lease float8[], p_max_deliveries integer[], p_result_ttl float8[],
    p_key text[], p_window float8[], p_body bytea[]
) RETURNS TABLE (o_job_id text, o_created boolean, o_full_queue text, o_depth bigint,
                 o_max_depth integer, o_drain_rate float8)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_now timestamptz := now();
    v_res text[] := p_id;  -- per item: the job it resolves to (its own id when it is new)
    v_keyed boolean;
    v_won text[];
    v_depth bigint;
    r record;
BEGIN
    v_keyed := EXISTS (SELECT 1 FROM unnest(p_key) AS k WHERE k IS NOT NULL);
    IF v_keyed THEN  -- a key held within its window, or used earlier in this batch, names that job
        SELECT array_agg(coalesce(h.job_id, f.first_id, i.id) ORDER BY i.n) INTO v_res
        FROM unnest(p_id, p_key) WITH ORDINALITY AS i(id, key, n)
        LEFT JOIN (
            SELECT DISTINCT ON (x.key) x.key, x.id AS first_id
            FROM unnest(p_id, p_key) WITH ORDINALITY AS x(id, key, n)
            WHERE x.key IS NOT NULL ORDER BY x.key, x.n
        ) f ON f.key = i.key
        LEFT JOIN {s}.idempotency h ON h.key = i.key AND h.expires_at > v_now;
    END IF;

    -- The bound: lock each bounded queue's row (in name order), so enqueues into it take turns.
    FOR r IN
        SELECT q.name, q.max_depth AS bound, a.adding
        FROM {s}.queues q
        JOIN (SELECT x.queue, count(*) AS adding FROM unnest(p_queue, p_id, v_res) AS x(queue, id, res)
              WHERE x.id = x.res GROUP BY x.queue) a ON a.queue = q.name
        WHERE q.max_depth IS NOT NULL
        ORDER BY q.name
        FOR UPDATE OF q
    LOOP
        SELECT coalesce(sum(c.queued), 0) INTO v_depth FROM {s}.queue_counts c WHERE c.queue = r.name;
        IF r.bound IS NOT NULL AND v_depth + r.adding > r.bound THEN
            RETURN QUERY SELECT NULL::text, false, r.name::text, v_depth, r.bound::integer,
                {s}.drain_rate(r.name);
            RETURN;
        END IF;
    END LOOP;

    IF v_keyed THEN
        WITH ins AS (
            INSERT INTO {s}.idempotency AS k (key, job_id, expires_at)
            SELECT x.key, x.id, v_now + x.win * interval '1 second'
            FROM unnest(p_key, p_id, p_window, v_res) AS x(key, id, win, res)
            WHERE x.key IS NOT NULL AND x.id = x.res
            ORDER BY x.key
            ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, expires_at = excluded.expires_at
            WHERE k.expires_at <= v_now
            RETURNING k.key
        )
        SELECT array_agg(ins.key) INTO v_won FROM ins;
        -- A key another transaction took since we looked names its job instead.
        SELECT array_agg(CASE WHEN x.key IS NULL OR x.key = ANY(coalesce(v_won, '{}')) THEN x.res
                              ELSE (SELECT k.job_id FROM {s}.idempotency k WHERE k.key = x.key) END
                         ORDER BY x.n)
        INTO v_res FROM unnest(p_key, v_res) WITH ORDINALITY AS x(key, res, n);
    END IF;

    INSERT INTO {s}.jobs (id, queue, task, state, priority, run_at, created_at, lease_seconds,
                          max_deliveries, result_ttl, idempotency_key, body)
    SELECT x.id, x.queue, x.task, 'queued', x.priority,
           CASE WHEN x.eta IS NULL THEN v_now ELSE greatest(v_now, to_timestamp(x.eta)) END,
           CASE WHEN x.created > 0 THEN to_timestamp(x.created) ELSE v_now END,
           x.lease, x.maxd, x.ttl, x.key, x.body
    FROM unnest(p_id, p_queue, p_task, p_priority, p_eta, p_created, p_lease, p_max_deliveries,
                p_result_ttl, p_key, p_body, v_res) WITH ORDINALITY
         AS x(id, queue, task, priority, eta, created, lease, maxd, ttl, key, body, res, n)
    WHERE x.id = x.res
    ORDER BY x.n
    ON CONFLICT (id) DO NOTHING;  -- a retried call whose first attempt committed

    PERFORM pg_notify('{channel}', q.queue) FROM (
        SELECT DISTINCT x.queue FROM unnest(p_queue, p_id, v_res) AS x(queue, id, res) WHERE x.id = x.res
    ) q;

    RETURN QUERY SELECT x.res, x.res = x.id, NULL::text, NULL::bigint, NULL::integer, NULL::float8
    FROM unnest(p_id, v_res) WITH ORDINALITY AS x(id, res, n) ORDER BY x.n;
END $fn$;

-- Make expired leases deliverable again, or dead-letter them past max_deliveries.
CREATE FUNCTION {s}.recover_leases(p_now timestamptz) RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    v_n integer;
    v_requeued text[];
    v_dead text[];
BEGIN
    WITH expired AS (
        SELECT j.id FROM {s}.jobs j WHERE j.state = 'running' AND j.lease_expires_at <= p_now
        ORDER BY j.lease_expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE {s}.jobs j SET
            state = CASE WHEN j.deliveries >= j.max_deliveries THEN 'dead' ELSE 'queued' END,
            error = CASE WHEN j.deliveries >= j.max_deliveries
                THEN 'delivered ' || j.deliveries || ' times without being settled (max_deliveries='
                     || j.max_deliveries || '); the worker crashed or lost its lease each time'
                ELSE j.error END,
            finished_at = CASE WHEN j.deliveries >= j.max_deliveries THEN p_now END,
            run_at = CASE WHEN j.deliveries >= j.max_deliveries THEN j.run_at ELSE p_now END,
            lease_expires_at = NULL
        FROM expired WHERE j.id = expired.id
        RETURNING j.queue, j.state
    )
    SELECT count(*), array_agg(DISTINCT m.queue) FILTER (WHERE m.state = 'queued'),
           array_agg(m.queue) FILTER (WHERE m.state = 'dead')
    INTO v_n, v_requeued, v_dead FROM moved m;
    IF v_dead IS NOT NULL THEN
        PERFORM {s}.count_finished(v_dead, p_now);
    END IF;
    PERFORM pg_notify('{channel}', q) FROM unnest(v_requeued) AS q;
    RETURN v_n;
END $fn$;

-- Lease up to p_limit ready jobs, highest priority first, then oldest. With none, one row whose
-- o_next_due says in how many seconds a delayed job becomes ready or a lease expires (or NULL).
CREATE FUNCTION {s}.fetch(p_queues text[], p_limit integer, p_worker text)
RETURNS TABLE (o_id text, o_queue text, o_body bytea, o_token bigint, o_deliveries integer,
               o_attempts integer, o_lease float8, o_next_due float8)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_now timestamptz := now();
BEGIN
    -- Lease bookkeeping needs no fsync: a lease lost to a crash only means a redelivery.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF EXISTS (SELECT 1 FROM {s}.jobs j WHERE j.state = 'running' AND j.lease_expires_at <= v_now)
       AND {s}.recover_leases(v_now) > 0 THEN
        -- Recovered jobs are visible to the next statement: the caller fetches again at once.
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::bytea, NULL::bigint, NULL::integer,
            NULL::integer, NULL::float8, 0::float8;
        RETURN;
    END IF;
    IF cardinality(p_queues) = 1 THEN
        RETURN QUERY
        WITH picked AS (
            SELECT j.id FROM {s}.jobs j
            WHERE j.state = 'queued' AND j.queue = p_queues[1] AND j.run_at <= v_now
            ORDER BY j.priority DESC, j.run_at, j.id
            LIMIT p_limit FOR UPDATE SKIP LOCKED
        ), taken AS (
            UPDATE {s}.jobs j SET state = 'running', deliveries = j.deliveries + 1,
                token = 1 + floor(random() * 9.0e18)::bigint, started_at = v_now, worker = p_worker,
                lease_expires_at = v_now + j.lease_seconds * interval '1 second'
            FROM picked WHERE j.id = picked.id
            RETURNING j.id, j.queue, j.body, j.token, j.deliveries, j.attempts, j.lease_seconds,
                      j.priority, j.run_at
        )
        SELECT t.id, t.queue, t.body, t.token, t.deliveries, t.attempts, t.lease_seconds, NULL::float8
        FROM taken t ORDER BY t.priority DESC, t.run_at, t.id;
    ELSE
        RETURN QUERY
        WITH picked AS (
            SELECT c.id FROM unnest(p_queues) AS q(name)
            CROSS JOIN LATERAL (
                SELECT j.id, j.priority, j.run_at FROM {s}.jobs j
                WHERE j.state = 'queued' AND j.queue = q.name AND j.run_at <= v_now
                ORDER BY j.priority DESC, j.run_at, j.id
                LIMIT p_limit FOR UPDATE SKIP LOCKED
            ) c
            ORDER BY c.priority DESC, c.run_at, c.id
            LIMIT p_limit
        ), taken AS (
            UPDATE {s}.jobs j SET state = 'running', deliveries = j.deliveries + 1,
                token = 1 + floor(random() * 9.0e18)::bigint, started_at = v_now, worker = p_worker,
                lease_expires_at = v_now + j.lease_seconds * interval '1 second'
            FROM picked WHERE j.id = picked.id
            RETURNING j.id, j.queue, j.body, j.token, j.deliveries, j.attempts, j.lease_seconds,
                      j.priority, j.run_at
        )
        SELECT t.id, t.queue, t.body, t.token, t.deliveries, t.attempts, t.lease_seconds, NULL::float8
        FROM taken t ORDER BY t.priority DESC, t.run_at, t.id;
    END IF;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::bytea, NULL::bigint, NULL::integer,
            NULL::integer, NULL::float8, extract(epoch FROM least(
                (SELECT min(d.due) FROM unnest(p_queues) AS q(name) CROSS JOIN LATERAL (
                    SELECT j.run_at AS due FROM {s}.jobs j
                    WHERE j.state = 'queued' AND j.queue = q.name AND j.run_at > v_now
                    ORDER BY j.run_at LIMIT 1) d),
                (SELECT min(j.lease_expires_at) FROM {s}.jobs j WHERE j.state = 'running')
            ) - v_now)::float8;
    END IF;
END $fn$;

-- Apply a batch of outcomes (ack, retry, dead, release) in one statement; returns the accepted
-- (id, token) pairs: a lease no longer current (fencing) is left unchanged and not returned.
CREATE FUNCTION {s}.settle(p_id text[], p_token bigint[], p_kind text[], p_result bytea[],
                           p_error text[], p_delay float8[])
RETURNS TABLE (o_id text, o_token bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_now timestamptz := now();
    v_ids text[];
    v_tokens bigint[];
    v_requeued text[];
    v_finished text[];
BEGIN
    WITH v AS (
        SELECT * FROM unnest(p_id, p_token, p_kind, p_result, p_error, p_delay)
            AS v(id, token, kind, result, error, delay)
    ), done AS (
        UPDATE {s}.jobs j SET
            state = CASE
                WHEN v.kind = 'ack' THEN 'succeeded'
                WHEN v.kind = 'dead' THEN 'dead'
                WHEN v.kind = 'release' THEN 'queued'
                WHEN j.deliveries >= j.max_deliveries THEN 'dead'
                ELSE 'queued' END,
            attempts = j.attempts + CASE WHEN v.kind IN ('retry', 'dead') THEN 1 ELSE 0 END,
            deliveries = j.deliveries - CASE WHEN v.kind = 'release' THEN 1 ELSE 0 END,
            result = CASE WHEN v.kind = 'ack' THEN v.result ELSE j.result END,
            error = CASE
                WHEN v.kind = 'ack' THEN NULL
                WHEN v.kind = 'release' THEN j.error
                WHEN v.kind = 'retry' AND j.deliveries >= j.max_deliveries
                    THEN 'max_deliveries (' || j.max_deliveries || ') reached; last error: '
                         || coalesce(v.error, '')
                ELSE v.error END,
            finished_at = CASE WHEN v.kind IN ('ack', 'dead')
                OR (v.kind = 'retry' AND j.deliveries >= j.max_deliveries) THEN v_now END,
            expires_at = CASE WHEN v.kind = 'ack' THEN v_now + j.result_ttl * interval '1 second' END,
            run_at = CASE WHEN v.kind = 'retry' THEN v_now + v.delay * interval '1 second'
                          WHEN v.kind = 'release' THEN v_now ELSE j.run_at END,
            lease_expires_at = NULL
        FROM v
        WHERE j.id = v.id AND j.token = v.token AND j.state = 'running' AND j.lease_expires_at > v_now
        RETURNING j.id, j.token, j.queue, j.state
    )
    SELECT array_agg(d.id), array_agg(d.token),
           array_agg(DISTINCT d.queue) FILTER (WHERE d.state = 'queued'),
           array_agg(d.queue) FILTER (WHERE d.state <> 'queued')
    INTO v_ids, v_tokens, v_requeued, v_finished FROM done d;
    IF v_finished IS NOT NULL THEN
        PERFORM {s}.count_finished(v_finished, v_now);
    END IF;
    PERFORM pg_notify('{channel}', q) FROM unnest(v_requeued) AS q;
    RETURN QUERY SELECT * FROM unnest(v_ids, v_tokens);
END $fn$;

CREATE FUNCTION {s}.extend(p_id text[], p_token bigint[])
RETURNS TABLE (o_id text, o_token bigint) LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- lease bookkeeping, as in fetch
    RETURN QUERY
    UPDATE {s}.jobs j SET lease_expires_at = now() + j.lease_seconds * interval '1 second'
    FROM unnest(p_id, p_token) AS v(id, token)
    WHERE j.id = v.id AND j.token = v.token AND j.state = 'running' AND j.lease_expires_at > now()
    RETURNING j.id, j.token;
END $fn$;

-- JSON of a body or result, or NULL where it is not valid JSON (for ad-hoc queries).
CREATE FUNCTION {s}.json_or_null(data bytea) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
    RETURN convert_from(data, 'UTF8')::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $fn$;

-- The jobs with their arguments and results as JSON: for people, not for the broker.
CREATE VIEW {s}.job_records AS
SELECT j.id, j.queue, j.task, j.state, j.priority, j.run_at, j.created_at, j.started_at,
       j.finished_at, j.deliveries, j.attempts, j.max_deliveries, j.worker, j.idempotency_key,
       j.error, {s}.json_or_null(j.body) -> 'args' AS args, {s}.json_or_null(j.body) -> 'kwargs' AS kwargs,
       {s}.json_or_null(j.result) AS result
FROM {s}.jobs j;
