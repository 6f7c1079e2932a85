-- Figures kept as work happens, so no page, API call or sweep costs more as
-- history grows (issue 24).
--
-- Two kinds of figures:
--   * deliveries by status now, per (tenant, target): delivery_counts;
--   * what happened in each minute: events received and attempts per tenant
--     (tenant_minutes, with deliveries that died), attempts per target
--     (target_minutes) and a latency histogram of the target's answered
--     attempts in fixed log buckets (target_latency_minutes, for p50/p99).
--
-- Statement-level triggers with transition tables keep them in the very
-- transactions that insert events and attempts and change deliveries, whatever
-- statement does it (a claim, a replay, a purge, a target's deletion, the
-- retention's cascade). A trigger never updates a shared row: it appends one
-- aggregated delta row per key touched by the statement to a *_deltas table,
-- so two workers recording attempts of one target never wait for each other
-- and never deadlock on a hot counter. fold_rollups() (the sweeper, every
-- tick) moves the deltas into the keyed tables; the *_now views read both, so
-- a figure is exact even before its delta is folded. The sweeper trims
-- minutes past RELAY_RETENTION_DAYS.

-- The writers wait while the figures of existing rows are backfilled, so no
-- row is counted twice or missed.
LOCK TABLE events, deliveries, attempts, delivery_deaths IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE delivery_counts (
    tenant_id text NOT NULL,
    target_id text NOT NULL,
    status    text NOT NULL,
    n         bigint NOT NULL,
    PRIMARY KEY (tenant_id, target_id, status)
);
CREATE INDEX delivery_counts_target_idx ON delivery_counts (target_id);
CREATE TABLE delivery_count_deltas (LIKE delivery_counts);

CREATE TABLE tenant_minutes (
    tenant_id text NOT NULL,
    minute    timestamptz NOT NULL,
    events    bigint NOT NULL,
    -- attempts with a 2xx answer, and the others (no answer, or not 2xx)
    ok        bigint NOT NULL,
    failed    bigint NOT NULL,
    died      bigint NOT NULL,
    PRIMARY KEY (tenant_id, minute)
);
CREATE INDEX tenant_minutes_minute_idx ON tenant_minutes (minute);
CREATE TABLE tenant_minute_deltas (LIKE tenant_minutes);

CREATE TABLE target_minutes (
    target_id       text NOT NULL,
    minute          timestamptz NOT NULL,
    tenant_id       text NOT NULL,
    ok              bigint NOT NULL,
    failed          bigint NOT NULL,
    last_attempt_at timestamptz NOT NULL,
    PRIMARY KEY (target_id, minute)
);
CREATE INDEX target_minutes_minute_idx ON target_minutes (minute);
CREATE TABLE target_minute_deltas (LIKE target_minutes);

-- bucket 0: 0 ms; bucket b >= 1: [2^((b-1)/4), 2^(b/4)) ms (about 19 % wide)
CREATE TABLE target_latency_minutes (
    target_id text NOT NULL,
    minute    timestamptz NOT NULL,
    bucket    smallint NOT NULL,
    n         bigint NOT NULL,
    PRIMARY KEY (target_id, minute, bucket)
);
CREATE INDEX target_latency_minutes_minute_idx ON target_latency_minutes (minute);
CREATE TABLE target_latency_minute_deltas (LIKE target_latency_minutes);

CREATE FUNCTION latency_bucket(ms integer) RETURNS smallint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN ms < 1 THEN 0
                ELSE least(1 + floor(4 * ln(ms::float8) / ln(2::float8)), 127) END::smallint
$$;

-- What readers read: folded rows plus the deltas not folded yet.
CREATE VIEW delivery_counts_now AS
    SELECT tenant_id, target_id, status, sum(n)::bigint AS n
    FROM (SELECT tenant_id, target_id, status, n FROM delivery_counts
          UNION ALL
          SELECT tenant_id, target_id, status, n FROM delivery_count_deltas) x
    GROUP BY tenant_id, target_id, status;

CREATE VIEW tenant_minutes_now AS
    SELECT tenant_id, minute, sum(events)::bigint AS events, sum(ok)::bigint AS ok,
           sum(failed)::bigint AS failed, sum(died)::bigint AS died
    FROM (SELECT * FROM tenant_minutes UNION ALL SELECT * FROM tenant_minute_deltas) x
    GROUP BY tenant_id, minute;

CREATE VIEW target_minutes_now AS
    SELECT target_id, minute, tenant_id, sum(ok)::bigint AS ok, sum(failed)::bigint AS failed,
           max(last_attempt_at) AS last_attempt_at
    FROM (SELECT * FROM target_minutes UNION ALL SELECT * FROM target_minute_deltas) x
    GROUP BY target_id, minute, tenant_id;

CREATE VIEW target_latency_minutes_now AS
    SELECT target_id, minute, bucket, sum(n)::bigint AS n
    FROM (SELECT * FROM target_latency_minutes
          UNION ALL
          SELECT * FROM target_latency_minute_deltas) x
    GROUP BY target_id, minute, bucket;

-- --- triggers: one aggregated delta per key a statement touched -------------------

CREATE FUNCTION rollup_events_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)
    SELECT tenant_id, date_trunc('minute', received_at), count(*), 0, 0, 0
    FROM new_rows WHERE NOT operational GROUP BY 1, 2;  -- upstream events (0010)
    RETURN NULL;
END
$$;

CREATE FUNCTION rollup_attempts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- each attempt's target by the deliveries' primary key (a scalar subquery: the
    -- transition table has no statistics, and a join could scan every delivery)
    WITH a AS MATERIALIZED (
        SELECT a.tenant_id,
               (SELECT d.target_id FROM deliveries d WHERE d.id = a.delivery_id) AS target_id,
               date_trunc('minute', a.started_at) AS minute,
               a.started_at, a.duration_ms, a.status_code,
               coalesce(a.status_code BETWEEN 200 AND 299, false) AS ok
        FROM new_rows a
    ), per_target AS (
        INSERT INTO target_minute_deltas (target_id, minute, tenant_id, ok, failed,
                                          last_attempt_at)
        SELECT target_id, minute, tenant_id, count(*) FILTER (WHERE ok),
               count(*) FILTER (WHERE NOT ok), max(started_at)
        FROM a GROUP BY 1, 2, 3
    ), latency AS (
        -- latency of the attempts that got an answer (a refused connection's 0 ms says
        -- nothing of the receiver's speed)
        INSERT INTO target_latency_minute_deltas (target_id, minute, bucket, n)
        SELECT target_id, minute, latency_bucket(duration_ms), count(*)
        FROM a WHERE status_code IS NOT NULL GROUP BY 1, 2, 3
    )
    INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)
    SELECT tenant_id, minute, 0, count(*) FILTER (WHERE ok), count(*) FILTER (WHERE NOT ok), 0
    FROM a GROUP BY 1, 2;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_deliveries_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_count_deltas (tenant_id, target_id, status, n)
    SELECT tenant_id, target_id, status, count(*) FROM new_rows GROUP BY 1, 2, 3;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_deliveries_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_count_deltas (tenant_id, target_id, status, n)
    SELECT tenant_id, target_id, status, -count(*) FROM old_rows GROUP BY 1, 2, 3;
    RETURN NULL;
END
$$;

CREATE FUNCTION count_deliveries_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH changed AS MATERIALIZED (
        SELECT o.tenant_id AS old_tenant, o.target_id AS old_target, o.status AS old_status,
               n.tenant_id, n.target_id, n.status
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        WHERE o.status IS DISTINCT FROM n.status
           OR o.target_id IS DISTINCT FROM n.target_id
           OR o.tenant_id IS DISTINCT FROM n.tenant_id
    ), died AS (
        -- deaths in the minute they happened (as delivery_deaths): a replay keeps them
        INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)
        SELECT tenant_id, date_trunc('minute', now()), 0, 0, 0, count(*)
        FROM changed WHERE status = 'dead' AND old_status IS DISTINCT FROM 'dead'
        GROUP BY 1
    )
    INSERT INTO delivery_count_deltas (tenant_id, target_id, status, n)
    SELECT tenant_id, target_id, status, sum(n) FROM (
        SELECT old_tenant AS tenant_id, old_target AS target_id, old_status AS status, -1 AS n
        FROM changed
        UNION ALL
        SELECT tenant_id, target_id, status, 1 FROM changed
    ) x
    GROUP BY 1, 2, 3 HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_rollup AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION rollup_events_inserted();
CREATE TRIGGER attempts_rollup AFTER INSERT ON attempts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION rollup_attempts_inserted();
CREATE TRIGGER deliveries_count_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION count_deliveries_inserted();
CREATE TRIGGER deliveries_count_update AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION count_deliveries_updated();
CREATE TRIGGER deliveries_count_delete AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION count_deliveries_deleted();

-- --- folding: one folder at a time, keys in one order ------------------------------

CREATE FUNCTION fold_rollups() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    moved bigint := 0;
    folded bigint;
BEGIN
    -- another folder is at it: its work is this one's
    IF NOT pg_try_advisory_xact_lock(125822885983600) THEN  -- "rollup"
        RETURN 0;
    END IF;
    WITH gone AS (DELETE FROM delivery_count_deltas RETURNING *), s AS (
        SELECT tenant_id, target_id, status, sum(n) AS n FROM gone GROUP BY 1, 2, 3
    ), up AS (
        INSERT INTO delivery_counts AS c (tenant_id, target_id, status, n)
        SELECT * FROM s ORDER BY 1, 2, 3
        ON CONFLICT (tenant_id, target_id, status) DO UPDATE SET n = c.n + excluded.n
        RETURNING 1
    ) SELECT count(*) INTO folded FROM up;
    moved := moved + folded;
    WITH gone AS (DELETE FROM tenant_minute_deltas RETURNING *), s AS (
        SELECT tenant_id, minute, sum(events) AS events, sum(ok) AS ok, sum(failed) AS failed,
               sum(died) AS died
        FROM gone GROUP BY 1, 2
    ), up AS (
        INSERT INTO tenant_minutes AS m (tenant_id, minute, events, ok, failed, died)
        SELECT * FROM s ORDER BY 1, 2
        ON CONFLICT (tenant_id, minute) DO UPDATE
        SET events = m.events + excluded.events, ok = m.ok + excluded.ok,
            failed = m.failed + excluded.failed, died = m.died + excluded.died
        RETURNING 1
    ) SELECT count(*) INTO folded FROM up;
    moved := moved + folded;
    WITH gone AS (DELETE FROM target_minute_deltas RETURNING *), s AS (
        SELECT target_id, minute, min(tenant_id) AS tenant_id, sum(ok) AS ok,
               sum(failed) AS failed, max(last_attempt_at) AS last_attempt_at
        FROM gone GROUP BY 1, 2
    ), up AS (
        INSERT INTO target_minutes AS m (target_id, minute, tenant_id, ok, failed,
                                         last_attempt_at)
        SELECT * FROM s ORDER BY 1, 2
        ON CONFLICT (target_id, minute) DO UPDATE
        SET ok = m.ok + excluded.ok, failed = m.failed + excluded.failed,
            last_attempt_at = greatest(m.last_attempt_at, excluded.last_attempt_at)
        RETURNING 1
    ) SELECT count(*) INTO folded FROM up;
    moved := moved + folded;
    WITH gone AS (DELETE FROM target_latency_minute_deltas RETURNING *), s AS (
        SELECT target_id, minute, bucket, sum(n) AS n FROM gone GROUP BY 1, 2, 3
    ), up AS (
        INSERT INTO target_latency_minutes AS m (target_id, minute, bucket, n)
        SELECT * FROM s ORDER BY 1, 2, 3
        ON CONFLICT (target_id, minute, bucket) DO UPDATE SET n = m.n + excluded.n
        RETURNING 1
    ) SELECT count(*) INTO folded FROM up;
    RETURN moved + folded;
END
$$;

-- --- the figures of what is already there ------------------------------------------

INSERT INTO delivery_counts (tenant_id, target_id, status, n)
SELECT tenant_id, target_id, status, count(*) FROM deliveries GROUP BY 1, 2, 3;

INSERT INTO tenant_minutes (tenant_id, minute, events, ok, failed, died)
SELECT tenant_id, minute, sum(events), sum(ok), sum(failed), sum(died) FROM (
    SELECT tenant_id, date_trunc('minute', received_at) AS minute, count(*) AS events,
           0 AS ok, 0 AS failed, 0 AS died
    FROM events WHERE NOT operational GROUP BY 1, 2
    UNION ALL
    SELECT tenant_id, date_trunc('minute', started_at), 0,
           count(*) FILTER (WHERE status_code BETWEEN 200 AND 299),
           count(*) FILTER (WHERE status_code IS NULL OR status_code NOT BETWEEN 200 AND 299), 0
    FROM attempts GROUP BY 1, 2
    UNION ALL
    SELECT tenant_id, date_trunc('minute', died_at), 0, 0, 0, count(*)
    FROM delivery_deaths GROUP BY 1, 2
) x GROUP BY 1, 2;

INSERT INTO target_minutes (target_id, minute, tenant_id, ok, failed, last_attempt_at)
SELECT d.target_id, date_trunc('minute', a.started_at), min(a.tenant_id),
       count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299),
       count(*) FILTER (WHERE a.status_code IS NULL OR a.status_code NOT BETWEEN 200 AND 299),
       max(a.started_at)
FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
GROUP BY 1, 2;

INSERT INTO target_latency_minutes (target_id, minute, bucket, n)
SELECT d.target_id, date_trunc('minute', a.started_at), latency_bucket(a.duration_ms), count(*)
FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
WHERE a.status_code IS NOT NULL
GROUP BY 1, 2, 3;
