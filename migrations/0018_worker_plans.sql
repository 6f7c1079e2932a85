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
-- with sequential scans off; the record becomes a PL/pgSQL function to carry that
-- setting, with the same statement, and the payloads are read by the claim.

ALTER FUNCTION rollup_attempts_inserted() SET enable_seqscan = off;

-- relay_claim (0016), with sequential scans off, and two changes:
-- - it answers the claimed deliveries' payloads. They were read after the call,
--   outside the claim lock: one more round trip per claim, on the path of every
--   delivery. Reading them by key holds the lock a few microseconds longer (and
--   for the time the answer takes to send: up to the cap's payloads).
-- - p_ending: the leases of the caller's attempts that have ended, whose record
--   is on its way, are not counted against the cap. An attempt that has its
--   answer is no longer in flight at the target, so a drainer claims their
--   replacements while it records them, not one round trip after. (A record
--   that then fails leaves the leases to lapse: those deliveries are sent again
--   then, never while the others are in flight beyond the cap.)
-- Old workers call it with eight arguments during a rolling upgrade: p_ending
-- has a default, and the payloads are a column they do not read.
DROP FUNCTION relay_claim(text, int, int, float8, text, int, float8, int);

CREATE FUNCTION relay_claim(
    p_target text, p_lock int, p_want int, p_lease_s float8,
    p_holder text, p_holding int, p_share_s float8, p_min_part int,
    -- leases of this drainer whose attempts have ended (their record is on its way):
    -- not in flight at the target any more, so not counted against its cap
    p_ending text[] DEFAULT '{}'
) RETURNS TABLE (
    id text, tenant_id text, url text, headers_enc bytea, secret_enc bytea,
    previous_secret_enc bytea, secret_rotated_at timestamptz, rate_limit int,
    max_in_flight int, live bool, failing bool, breaker text,
    consecutive_failures int, cooling bool, open_until timestamptz, on_dead text,
    -- drainers of other processes sharing the cap (as many as leave each a part
    -- of p_min_part or more); due deliveries left because the cap was full and
    -- this drainer may have a part; whether it keeps a share (drain_shares)
    sharers int, kept_out bool, sharing bool,
    -- the claimed deliveries, in id order
    claimed text[], event_ids text[], attempt_counts int[], leases timestamptz[],
    order_keys text[],
    -- the claimed deliveries' events' payloads, by event id (a delivery whose event
    -- is gone, which retention never leaves, has none)
    payload_ids text[], payloads bytea[]
)
LANGUAGE plpgsql VOLATILE
-- the due rows are read in the due index's order, never gathered and sorted (with
-- statistics taken while the queue was empty, the planner read every pending
-- delivery of the target through another index to sort them: 2,180 pages at a
-- backlog of 40,000); a disabled sort's penalty would pass jit_above_cost, and a
-- compiled claim costs ~130 ms (tests/integration/test_claim_cost.py)
SET enable_sort = off
SET jit = off
SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
DECLARE
    v_cap int;
    v_ask int;
    v_due int;
    v_taken int;
    v_shared bool;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock, hashtext(p_target));
    -- read with a snapshot taken once the lock is held
    SELECT t.id, t.tenant_id, t.url, t.headers_enc, t.secret_enc, t.previous_secret_enc,
           t.secret_rotated_at, t.rate_limit, t.max_in_flight,
           t.enabled AND t.deleted_at IS NULL, t.failing_since IS NOT NULL,
           coalesce(h.breaker, 'closed'), coalesce(h.consecutive_failures, 0),
           coalesce(h.open_until > now(), false), h.open_until, t.on_dead
    INTO id, tenant_id, url, headers_enc, secret_enc, previous_secret_enc,
         secret_rotated_at, rate_limit, max_in_flight, live, failing, breaker,
         consecutive_failures, cooling, open_until, on_dead
    FROM targets t LEFT JOIN target_health h ON h.target_id = t.id
    WHERE t.id = p_target;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    sharers := 0;
    IF p_holder IS NOT NULL THEN
        SELECT count(*) INTO sharers FROM drain_shares s
        WHERE s.target_id = p_target AND s.holder <> p_holder AND s.until > now();
    END IF;
    kept_out := false;
    sharing := false;
    claimed := '{}';
    event_ids := '{}';
    attempt_counts := '{}';
    leases := '{}';
    order_keys := '{}';
    payload_ids := '{}';
    payloads := '{}';
    IF NOT live OR cooling OR p_want <= 0 THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- an open or half-open breaker lets one probe through
    v_cap := CASE WHEN breaker <> 'closed' THEN 1 ELSE max_in_flight END;
    -- A cap is shared only in parts of p_min_part or more: smaller parts would cost
    -- each drainer a claim and a record per handful of deliveries, and a cap that
    -- small keeps one process busy for a fraction of its time.
    v_shared := v_cap >= 2 * p_min_part;
    sharers := least(sharers, greatest(v_cap / p_min_part - 1, 0));
    -- this drainer's part of the cap: the cap divided among the drainers sharing it
    v_ask := least(p_want, v_cap, (v_cap + sharers) / (1 + sharers) - p_holding);
    IF v_ask <= 0 THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- Up to v_ask due deliveries, never more than v_cap leased at once in all. The
    -- LIMIT the planner sees is a plain parameter (a computed one made it expect
    -- hundreds of rows and scan whole tables once statistics existed); the cap
    -- trims after it. Leased rows come first in the due index (they are due):
    -- SKIP LOCKED and the lease filter pass over at most the cap of them. The
    -- leases held are counted in delivery_leases (0014), where the claim writes
    -- them: the delivery's own update changes no indexed column, so it is HOT. The
    -- rows picked (and locked) are updated by their ctid: joined by id, a planner
    -- that believed the partition empty drove the join from an index of every
    -- pending delivery.
    WITH picked AS (
        SELECT d.id, d.next_attempt_at, d.ctid FROM deliveries_open d
        WHERE d.target_id = p_target AND d.status IN ('pending', 'retrying')
          AND d.next_attempt_at <= now()
          AND (d.locked_until IS NULL OR d.locked_until < now())
        ORDER BY d.next_attempt_at
        LIMIT v_ask
        FOR UPDATE SKIP LOCKED
    ), allowed AS MATERIALIZED (
        SELECT p.ctid FROM picked p ORDER BY p.next_attempt_at
        LIMIT greatest(0, v_cap - (
            SELECT count(*) FROM delivery_leases l
            WHERE l.target_id = p_target AND l.locked_until > now()
              AND l.delivery_id <> ALL(coalesce(p_ending, '{}'))
        )::int)
    ), took AS (
        UPDATE deliveries_open d
        SET locked_until = now() + make_interval(secs => p_lease_s), updated_at = now()
        WHERE d.ctid = ANY(ARRAY(SELECT a.ctid FROM allowed a))
        RETURNING d.id, d.target_id, d.event_id, d.attempt_count, d.locked_until, d.order_key
    ), leased AS (
        INSERT INTO delivery_leases (delivery_id, target_id, locked_until)
        SELECT k.id, k.target_id, k.locked_until FROM took k
        ON CONFLICT (delivery_id) DO UPDATE SET locked_until = excluded.locked_until
    )
    SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM allowed),
           coalesce(array_agg(k.id ORDER BY k.id), '{}'),
           coalesce(array_agg(k.event_id ORDER BY k.id), '{}'),
           coalesce(array_agg(k.attempt_count ORDER BY k.id), '{}'),
           coalesce(array_agg(k.locked_until ORDER BY k.id), '{}'),
           coalesce(array_agg(k.order_key ORDER BY k.id), '{}')
    INTO v_due, v_taken, claimed, event_ids, attempt_counts, leases, order_keys
    FROM took k;
    -- the payloads, by the events' ids given as values (EXECUTE plans with them), so
    -- that Postgres opens and locks only the partitions of those events, not every
    -- day's (tests/integration/test_partitioned_history.py)
    IF cardinality(event_ids) > 0 THEN
        EXECUTE 'SELECT coalesce(array_agg(e.id), ''{}''), coalesce(array_agg(e.payload), ''{}'')'
                ' FROM events e WHERE e.id = ANY($1)'
        INTO payload_ids, payloads USING event_ids;
    END IF;
    kept_out := v_shared AND v_due > v_taken;
    -- a backlog (as many due as asked for, or some kept out by the cap): this
    -- drainer shares the target's cap for p_share_s seconds more
    IF p_holder IS NOT NULL AND v_shared AND v_due > 0
       AND (v_due >= v_ask OR v_due > v_taken) THEN
        INSERT INTO drain_shares AS s (target_id, holder, until)
        VALUES (p_target, p_holder, now() + make_interval(secs => p_share_s))
        ON CONFLICT (target_id, holder) DO UPDATE SET until = excluded.until;
        sharing := true;
    END IF;
    IF cardinality(claimed) > 0 AND breaker = 'open' THEN
        UPDATE target_health h SET breaker = 'half_open', changed_at = now()
        WHERE h.target_id = p_target;
    END IF;
    RETURN NEXT;
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
