-- Each tenant's figures per hour as well as per minute (issue 24, item 1).
--
-- The console's overview sums a day of each tenant's figures. From per-minute
-- rows that is 1,440 rows a tenant once a day of traffic is there: with history
-- the page took 1.6 to 1.9 times its empty-database time. fold_rollups() now adds
-- each folded delta to its hour too (tenant_hours), so a day's figures read at most
-- 60 minutes (the part of the first hour in the window) and 24 hours, however busy
-- the day was; the hot path is unchanged (its triggers still append one delta).
--
-- Hours are UTC hours (date_trunc(..., 'UTC')), whatever a session's TimeZone, so
-- that the folder and every reader cut the day at the same instants.

CREATE TABLE tenant_hours (
    tenant_id text NOT NULL,
    hour      timestamptz NOT NULL,
    events    bigint NOT NULL,
    ok        bigint NOT NULL,
    failed    bigint NOT NULL,
    died      bigint NOT NULL,
    PRIMARY KEY (tenant_id, hour)
);
CREATE INDEX tenant_hours_hour_idx ON tenant_hours (hour);

-- No fold runs while the hours of what is already folded are backfilled: a fold
-- that tries now finds the lock taken and leaves its deltas for the next tick,
-- when the new fold_rollups() adds them to both.
SELECT pg_advisory_xact_lock(125822885983600);  -- "rollup", as fold_rollups() takes it

INSERT INTO tenant_hours (tenant_id, hour, events, ok, failed, died)
SELECT tenant_id, date_trunc('hour', minute, 'UTC'), sum(events), sum(ok), sum(failed),
       sum(died)
FROM tenant_minutes GROUP BY 1, 2;

CREATE OR REPLACE FUNCTION fold_rollups() RETURNS bigint LANGUAGE plpgsql AS $$
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
    ), hours AS (
        INSERT INTO tenant_hours AS h (tenant_id, hour, events, ok, failed, died)
        SELECT tenant_id, date_trunc('hour', minute, 'UTC'), sum(events), sum(ok),
               sum(failed), sum(died)
        FROM s GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (tenant_id, hour) DO UPDATE
        SET events = h.events + excluded.events, ok = h.ok + excluded.ok,
            failed = h.failed + excluded.failed, died = h.died + excluded.died
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
