-- A worker's statements plan by their indexes however small the tables were when
-- planned (issue 24, item 1).
--
-- A worker's connection keeps its plans for its life: the claim's and the
-- attempts' rollup trigger's (PL/pgSQL), the payload read's and the record's
-- (prepared statements). Planned while the day's partitions were small (a new
-- install, a new day, a bench's database), and never again until an ANALYZE,
-- each read whole tables for every batch: the payload read every event of the
-- day, the claim's update and the record every open delivery (dead letters and
-- dead tuples included), the rollup every delivery of the day, for each attempt.
-- At 500 events/s to one target, that was most of Postgres's CPU: the record
-- took 1.8 ms a call and the payload read 1.3 ms, each a point lookup. A batch
-- of 16 after 20,000 events and deliveries read 200,922 tuples
-- (tests/integration/test_delivery_plan.py).
--
-- So, as relay_ingest (0017): every one of them looks rows up by key, and plans
-- with sequential scans off; the payload read and the record become PL/pgSQL
-- functions to carry that setting, with the same statements.

ALTER FUNCTION relay_claim(text, int, int, float8, text, int, float8, int)
    SET enable_seqscan = off;

ALTER FUNCTION rollup_attempts_inserted() SET enable_seqscan = off;

-- The claimed deliveries' events, by id (the ids are values, so Postgres opens only
-- their partitions).
CREATE FUNCTION relay_payloads(p_ids text[]) RETURNS TABLE (id text, payload bytea)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY SELECT e.id, e.payload FROM events e WHERE e.id = ANY(p_ids);
END
$fn$;

-- The record of a batch of attempts of target p_target: each delivery's new state,
-- its lease freed, its attempt kept, in one statement (relay/store/claims.py,
-- record_batch). A delivery is updated only if its lease is the one given (p_leases)
-- and it is still pending or retrying; an attempt is inserted only for a delivery
-- whose lease still held. p_expect_failing: the failing state of the target the
-- caller expects (NULL: no check); if the row, as this statement sees it,
-- disagrees, nothing is written. It answers the state it saw and the ids recorded.
CREATE FUNCTION relay_record(
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
        RETURNING d.id, d.tenant_id
    ), freed AS (
        DELETE FROM delivery_leases l USING unnest(p_ids, p_leases) AS r(id, lease)
        WHERE l.delivery_id = r.id AND l.locked_until = r.lease
          AND l.delivery_id IN (SELECT k.id FROM done k)
    ), kept AS (
        INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms,
                              status_code, error, response_body)
        SELECT a.id, k.tenant_id, a.delivery_id, a.started_at, a.duration_ms, a.code,
               a.error, a.body
        FROM unnest(p_attempt_ids, p_ids, p_started, p_durations, p_codes, p_errors,
                    p_bodies) AS a(id, delivery_id, started_at, duration_ms, code, error, body)
        JOIN done k ON k.id = a.delivery_id
    )
    SELECT (SELECT x.failing FROM target x), array(SELECT k.id FROM done k);
END
$fn$;
