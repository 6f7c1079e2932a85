-- A lighter record (issue 24, item 3: the delivery's ratio to the durable ceiling).
--
-- bench/pg_cycle.py (one drainer's claims and records, 20,000 deliveries, no HTTP),
-- two databases drained side by side: a record spent in Postgres, a delivery,
--   - three foreign-key checks (each a SPI query with its executor started and a
--     FOR KEY SHARE lock): the succeeded delivery's tenant and target as it moves
--     into deliveries_sent, and the attempt's tenant: 11.5 us of 78;
--   - the attempts' rollup finding each attempt's target in deliveries (a probe
--     of every deliveries partition by id): 4.5 us.
--
-- 1. deliveries' keys to tenants and targets are checked where its rows are
--    made: on deliveries_open, where every delivery is inserted, pending
--    (relay_ingest, relay_insert_deliveries, emit_operational). A row moves to
--    deliveries_sent only from there, with the tenant and target it was checked
--    with (no statement changes a delivery's tenant or target), and neither
--    tenants nor targets are ever deleted (a target's DELETE sets deleted_at).
--    (A row inserted straight into deliveries_sent is not checked: no writer of
--    Relay's does that; bench/history.py's fill does, with real keys.)
--    The same holds for an attempt's tenant: relay_record writes its delivery's.
-- 2. An attempt carries its target (target_id, NULL in the rows made before):
--    relay_record writes it, and the rollup reads it rather than the delivery.
-- 3. A claim's update of a delivery is HOT only if its new version fits on its
--    page (0014). A drainer alone on its target leases up to twice its cap at
--    once (0024): contiguous rows, most of a page's rows in one transaction, so
--    the 30 % kept free held about half of their new versions (55 % HOT; each
--    other one a new entry in the 7 indexes of a waiting delivery): 7.3 us a
--    delivery. 55 % of each page is kept free now (a new version is 8 bytes
--    wider than the one it replaces, locked_until set): 100 % HOT. The partition
--    holds what waits to be sent and the dead letters; each row is written a few
--    times and leaves, so the space is the price of a queue's table.

-- Dropping a key locks its table and the one it references (ACCESS EXCLUSIVE): the
-- relay's reads and writes of tenants, targets, deliveries and attempts wait for
-- this migration, and it waits for theirs. It takes them all first, and gives up
-- after 10 s rather than stall them behind it (run `relay migrate` again); a
-- deadlock with a worker's transaction aborts one of the two, never half of this.
SET LOCAL lock_timeout = '10s';
LOCK TABLE tenants, targets, deliveries, attempts IN ACCESS EXCLUSIVE MODE;

ALTER TABLE deliveries DROP CONSTRAINT deliveries_target_id_fkey,
    DROP CONSTRAINT deliveries_tenant_id_fkey;
-- NOT VALID: the rows there now were checked by the keys just dropped (no scan
-- while the locks are held); every row written from now on is checked
ALTER TABLE deliveries_open
    ADD CONSTRAINT deliveries_open_target_id_fkey FOREIGN KEY (target_id) REFERENCES targets (id)
        NOT VALID,
    ADD CONSTRAINT deliveries_open_tenant_id_fkey FOREIGN KEY (tenant_id) REFERENCES tenants (id)
        NOT VALID;
ALTER TABLE attempts DROP CONSTRAINT attempts_tenant_id_fkey;

ALTER TABLE attempts ADD COLUMN target_id text;

-- (pages filled before keep their room until they are rewritten)
ALTER TABLE deliveries_open SET (fillfactor = 45);

-- An attempt's target when the attempt does not carry it (a row written by a
-- writer other than relay_record): its delivery's. A function, called only for
-- such a row: a plan holding the look-up itself opens and locks every partition
-- of deliveries (each day's sent ones) each time it starts, run or not (with 40
-- days kept, ~+260 us a record of two deliveries, bench/pg_cycle.py).
CREATE FUNCTION relay_delivery_target(p_delivery text) RETURNS text
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT d.target_id FROM deliveries d WHERE d.id = p_delivery
$$;

-- as 0011's, with the attempt's own target when it has one (and 0018's setting,
-- which CREATE OR REPLACE would drop)
CREATE OR REPLACE FUNCTION rollup_attempts_inserted() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
BEGIN
    WITH a AS MATERIALIZED (
        SELECT a.tenant_id, coalesce(a.target_id, relay_delivery_target(a.delivery_id))
                   AS target_id,
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

-- as 0018's, writing each attempt's target (its delivery's)
CREATE OR REPLACE FUNCTION relay_record(
    p_ids text[], p_leases timestamptz[], p_statuses text[], p_delays float8[],
    p_carried float8[], p_codes int[], p_errors text[], p_attempt_ids text[],
    p_started timestamptz[], p_durations int[], p_bodies text[], p_target text,
    p_expect_failing bool
) RETURNS TABLE (failing bool, ids text[])
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH target AS MATERIALIZED (
        SELECT t.failing_since IS NOT NULL AS failing FROM targets t WHERE t.id = p_target
    ), done AS (
        UPDATE deliveries d
        SET status = r.status, attempt_count = d.attempt_count + 1,
            next_attempt_at = now() + make_interval(secs => r.delay),
            enqueued_until = now() + make_interval(secs => coalesce(r.carried, r.delay)),
            locked_until = NULL, last_status_code = r.code, last_error = r.error,
            updated_at = now()
        FROM unnest(p_ids, p_leases, p_statuses, p_delays, p_carried, p_codes, p_errors)
            AS r(id, lease, status, delay, carried, code, error)
        WHERE d.id = r.id AND d.locked_until = r.lease AND d.status IN ('pending', 'retrying')
          AND (p_expect_failing IS NULL OR p_expect_failing = (SELECT x.failing FROM target x))
        RETURNING d.id, d.tenant_id, d.target_id
    ), freed AS (
        DELETE FROM delivery_leases l USING unnest(p_ids, p_leases) AS r(id, lease)
        WHERE l.delivery_id = r.id AND l.locked_until = r.lease
          AND l.delivery_id IN (SELECT k.id FROM done k)
    ), kept AS (
        INSERT INTO attempts (id, tenant_id, target_id, delivery_id, started_at,
                              duration_ms, status_code, error, response_body)
        SELECT a.id, k.tenant_id, k.target_id, a.delivery_id, a.started_at, a.duration_ms, a.code,
               a.error, a.body
        FROM unnest(p_attempt_ids, p_ids, p_started, p_durations, p_codes, p_errors,
                    p_bodies) AS a(id, delivery_id, started_at, duration_ms, code, error, body)
        JOIN done k ON k.id = a.delivery_id
    )
    SELECT (SELECT x.failing FROM target x), array(SELECT k.id FROM done k);
END
$fn$;
