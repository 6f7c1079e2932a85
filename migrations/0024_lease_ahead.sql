-- A drainer leases ahead of its target's cap (issue 24, item 3: the delivery's
-- ratio to the durable ceiling).
--
-- Timed inside the drainer (bench/drain.py, cap 32, 2 worker processes), a cycle
-- of 32 deliveries took 10.3 ms: the claim 4.15 ms, waiting for the record 3.06,
-- the attempts themselves 3.04. Every slot of the cap waited for the next claim
-- about 40 % of the time, and the machine idled at 81-85 % busy, where the
-- ceiling's worker (claims of 256, 64 in flight) kept it at 92-95 %.
--
-- Now a drainer alone on its target may lease up to twice its part (p_ahead): its
-- process starts no more than the part at once and queues the rest, starting one
-- the moment an attempt ends, while the next claim is made. max_in_flight stays
-- strict across processes (API.md: "across all workers"): the claim leases ahead
-- only while no other drainer holds a live lease of the target (delivery_leases
-- now names the holder), and another drainer's claim counts the queued leases as
-- in flight. A lease of a worker from before this migration has no holder, so it
-- counts as another drainer's.

ALTER TABLE delivery_leases ADD COLUMN holder text;

DROP FUNCTION relay_claim(text, int, int, float8, text, int, float8, int, text[], int);

CREATE FUNCTION relay_claim(
    p_target text, p_lock int, p_want int, p_lease_s float8,
    p_holder text, p_holding int, p_share_s float8, p_min_part int,
    -- leases of this drainer whose attempts have ended (their record is on its way):
    -- not in flight at the target any more, so not counted against its cap
    p_ending text[] DEFAULT '{}',
    -- payloads past this many bytes in all are answered NULL (relay_payloads reads
    -- them); NULL: all
    p_inline_bytes int DEFAULT NULL,
    -- leases this drainer may take past its part of the cap, as long as no other
    -- drainer holds a lease of the target (0: none; a worker from before this
    -- migration passes none)
    p_ahead int DEFAULT 0
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
    -- is gone, which retention never leaves, has none; one past p_inline_bytes is NULL)
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
    v_ahead int := 0;
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
    -- Leasing ahead: a drainer alone on a target, its breaker closed, may lease
    -- up to p_ahead more than its part, queued in its process and started there as
    -- its attempts end, so that the cap stays full while it claims again. It keeps
    -- the cap strict across processes: it is taken only while no other drainer
    -- holds a live lease of the target, and any other drainer's claim counts the
    -- rows queued as in flight. So either one drainer holds every lease, and its
    -- process starts no more than its part at once, or the leases are within the cap.
    IF coalesce(p_ahead, 0) > 0 AND p_holder IS NOT NULL AND breaker = 'closed'
       AND sharers = 0 AND NOT EXISTS (
           SELECT 1 FROM delivery_leases l
           WHERE l.target_id = p_target AND l.locked_until > now()
             AND l.holder IS DISTINCT FROM p_holder) THEN
        v_ahead := least(p_ahead, v_cap);
    END IF;
    -- this drainer's part of the cap: the cap divided among the drainers sharing it
    v_ask := least(p_want, v_cap + v_ahead,
                   (v_cap + sharers) / (1 + sharers) + v_ahead - p_holding);
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
        LIMIT greatest(0, v_cap + v_ahead - (
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
        INSERT INTO delivery_leases (delivery_id, target_id, locked_until, holder)
        SELECT k.id, k.target_id, k.locked_until, p_holder FROM took k
        ON CONFLICT (delivery_id) DO UPDATE
        SET locked_until = excluded.locked_until, holder = excluded.holder
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
        -- (those within p_inline_bytes in all, in id order; a payload that alone
        -- passes it is not counted, and is read apart)
        EXECUTE 'SELECT coalesce(array_agg(s.id), ''{}''),'
                ' coalesce(array_agg(CASE WHEN $2 IS NULL OR (s.size <= $2 AND s.running <= $2)'
                ' THEN s.payload END), ''{}'')'
                ' FROM (SELECT e.id, e.payload, octet_length(e.payload) AS size,'
                ' sum(CASE WHEN octet_length(e.payload) <= $2 THEN octet_length(e.payload) END)'
                ' OVER (ORDER BY e.id) AS running'
                ' FROM events e WHERE e.id = ANY($1)) s'
        INTO payload_ids, payloads USING event_ids, p_inline_bytes;
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

-- planned once per connection (0023)
ALTER FUNCTION relay_claim(text, int, int, float8, text, int, float8, int, text[], int, int)
    SET plan_cache_mode = force_generic_plan;
