-- A group commit is one call (issue 24, item 3): relay_ingest().
--
-- A group of ingest requests took five round trips: BEGIN, the uuids' locks, the
-- events' insert, the deliveries' insert, COMMIT. At 1,000 single events/s the
-- groups are of one or two requests, so each event paid all five, and each round
-- trip waits for both processes to be scheduled on a busy machine: the gateway
-- answered in 13 ms (median), and the group commit was 37 % of its CPU.
--
-- Plans. The function's plans (and the prepared statements' before it) are kept
-- for the session: planned while today's events partition was small, the uuid
-- check read the whole partition for each event, until the next ANALYZE (a group
-- of 16 events cost 21 ms of Postgres's CPU after 30,000 events in the
-- partition, 1 ms with the index). So the function plans with sequential scans
-- off, and always generically (custom plans, made again at each call while the
-- planner guessed them cheaper, cost 130 us a call); its statements are written
-- so that a generic plan, which cannot see how long the arrays are, still
-- checks each row by an index probe (tests/integration/test_ingest_plan.py).
--
-- The statements are the same, in the same order; a PL/pgSQL function runs each
-- with a fresh snapshot (the insert sees what the holder of a uuid's lock
-- committed before this call took it). Called alone, it is its own transaction:
-- one round trip. The deliveries of ordered targets are not inserted here: their
-- keys' locks are taken after the uuids' (relay/store/events.py), in the
-- caller's transaction around this call.

-- The locks of the (source, uuid bucket)s of events, in one order everywhere
-- (sorted), held to the commit. Buckets: relay.store.events.UUID_LOCK_BUCKETS.
CREATE FUNCTION relay_lock_uuids(p_sources text[], p_uuids text[], p_lock int, p_buckets int)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
-- PL/pgSQL, not SQL: a SQL function's statement is planned again at every call
DECLARE
    v_locks bigint;
BEGIN
    SELECT count(pg_advisory_xact_lock(p_lock, k.h)) INTO v_locks FROM (
        SELECT DISTINCT hashtext(w.source_id || '/' || (hashtext(w.uuid) & (p_buckets - 1))) AS h
        FROM unnest(p_sources, p_uuids) AS w(source_id, uuid)
        WHERE w.uuid IS NOT NULL
        ORDER BY 1
    ) k;
    RETURN v_locks;
END
$fn$;

CREATE FUNCTION relay_ingest(
    -- the events, one element each: ids, tenant, source, upstream uuid, date, type,
    -- action, object id, upstream tenant, payload, and the config version its
    -- request was routed at (-1: not checked)
    p_ids text[], p_tenants text[], p_sources text[], p_uuids text[], p_dates text[],
    p_types text[], p_actions text[], p_object_ids text[], p_tenant_refs text[],
    p_payloads bytea[], p_versions int8[],
    -- each (tenant, version) of the group once
    p_pair_tenants text[], p_pair_versions int8[],
    p_uuid_lock int, p_uuid_buckets int,
    -- deliveries of unordered targets: id, tenant, event, target (inserted for the
    -- events inserted here, when the target is still enabled and live)
    p_dlv_ids text[], p_dlv_tenants text[], p_dlv_events text[], p_dlv_targets text[],
    p_grace_s float8, p_first_delay_s float8
) RETURNS TABLE (
    -- the events inserted (an event whose uuid its source had, or whose request was
    -- routed by a stale read, is not)
    inserted text[],
    -- the (tenant, version) pairs still current: their requests were stored
    fresh_tenants text[], fresh_versions int8[],
    -- the events already stored for the uuids of events not inserted
    existing_sources text[], existing_uuids text[], existing_ids text[],
    -- the deliveries inserted
    delivery_ids text[]
)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
DECLARE
    v_incoming int;
    v_all bool;
BEGIN
    PERFORM relay_lock_uuids(p_sources, p_uuids, p_uuid_lock, p_uuid_buckets);
    -- Read your writes: a request's events are inserted only if its tenant's
    -- config_version is still the one its routes were read at. De-duplication: an
    -- event whose uuid its source already has (stored, or earlier in this call) is
    -- not inserted; the uuids' locks make the check and the insert one step for
    -- each (source, uuid).
    WITH fresh AS MATERIALIZED (
        SELECT v.tenant_id, v.version
        FROM unnest(p_pair_tenants, p_pair_versions) AS v(tenant_id, version)
        JOIN tenants t ON t.id = v.tenant_id
        WHERE v.version = -1 OR t.config_version = v.version
    ), incoming AS MATERIALIZED (
        SELECT e.*, row_number() OVER (PARTITION BY e.source_id, e.uuid ORDER BY e.n) AS nth
        FROM unnest(p_ids, p_tenants, p_sources, p_uuids, p_dates, p_types, p_actions,
                    p_object_ids, p_tenant_refs, p_payloads, p_versions) WITH ORDINALITY
             AS e(id, tenant_id, source_id, uuid, date, object_type, action, object_id,
                  tenant_ref, payload, version, n)
        WHERE (e.tenant_id, e.version) IN (SELECT f.tenant_id, f.version FROM fresh f)
    ), put AS (
        INSERT INTO events (id, tenant_id, source_id, upstream_uuid, upstream_date,
                            object_type, action, object_id, upstream_tenant_id, payload)
        SELECT e.id, e.tenant_id, e.source_id, e.uuid, e.date, e.object_type, e.action,
               e.object_id, e.tenant_ref, e.payload
        FROM incoming e
        WHERE e.uuid IS NULL OR (e.nth = 1 AND NOT EXISTS (
            SELECT 1 FROM events x WHERE x.source_id = e.source_id AND x.upstream_uuid = e.uuid
        ))
        RETURNING id
    )
    SELECT (SELECT coalesce(array_agg(put.id), '{}') FROM put),
           (SELECT count(*) FROM incoming),
           (SELECT coalesce(array_agg(f.tenant_id), '{}') FROM fresh f),
           (SELECT coalesce(array_agg(f.version), '{}') FROM fresh f)
    INTO inserted, v_incoming, fresh_tenants, fresh_versions;
    existing_sources := '{}';
    existing_uuids := '{}';
    existing_ids := '{}';
    -- What the uuids not inserted map to (this call's own inserts included). An
    -- event was not inserted if no event has its id: ids are new to each call.
    IF cardinality(inserted) < v_incoming THEN
        SELECT coalesce(array_agg(x.source_id), '{}'), coalesce(array_agg(x.upstream_uuid), '{}'),
               coalesce(array_agg(x.id), '{}')
        INTO existing_sources, existing_uuids, existing_ids
        FROM (
            SELECT DISTINCT w.source_id, w.uuid
            FROM unnest(p_ids, p_tenants, p_sources, p_uuids, p_versions)
                 AS w(id, tenant_id, source_id, uuid, version)
            WHERE w.uuid IS NOT NULL
              AND (w.tenant_id, w.version) IN (SELECT * FROM unnest(fresh_tenants, fresh_versions))
              AND (SELECT true FROM events e WHERE e.id = w.id LIMIT 1) IS NULL
        ) lost
        CROSS JOIN LATERAL (
            SELECT x.source_id, x.upstream_uuid, x.id FROM events x
            WHERE x.source_id = lost.source_id AND x.upstream_uuid = lost.uuid
            LIMIT 1
        ) x;
    END IF;
    delivery_ids := '{}';
    IF cardinality(p_dlv_ids) = 0 THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- A delivery is made for an event inserted here (an event of another call has
    -- another id: checked only when some were not inserted), and only for a
    -- target that is enabled and live at this instant, whatever the gateway's
    -- cache believed. Each row probes the targets' and the events' primary keys,
    -- written so that the planner cannot do otherwise (a LATERAL with a LIMIT, a
    -- scalar subquery): as joins and EXISTS, a generic plan (it cannot see how
    -- long the arrays are) read every target of the tenant for each delivery, and
    -- hashed every event of the day's partition.
    v_all := cardinality(inserted) = cardinality(p_ids);
    WITH put AS (
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, next_attempt_at,
                                enqueued_until)
        SELECT d.id, d.tenant_id, d.event_id, d.target_id,
               now() + make_interval(secs => p_first_delay_s),
               now() + make_interval(secs => p_first_delay_s + p_grace_s)
        FROM unnest(p_dlv_ids, p_dlv_tenants, p_dlv_events, p_dlv_targets)
             AS d(id, tenant_id, event_id, target_id)
        CROSS JOIN LATERAL (
            SELECT 1 FROM targets t
            WHERE t.id = d.target_id AND t.tenant_id = d.tenant_id AND t.enabled
              AND t.deleted_at IS NULL
            LIMIT 1
        ) live
        WHERE v_all OR (SELECT true FROM events e WHERE e.id = d.event_id LIMIT 1)
        RETURNING deliveries.id
    )
    SELECT coalesce(array_agg(put.id), '{}') INTO delivery_ids FROM put;
    RETURN NEXT;
END
$fn$;

-- Deliveries with ordering keys (the caller holds their keys' locks and drew their
-- positions), or any, made after their event: ordered targets' at ingest, and
-- those of add_deliveries (relay/store/events.py). A delivery of a key waits
-- (parked: no next_attempt_at) behind any undelivered one of its key, earlier in
-- this call or already stored (dead ones too when the target blocks on a dead
-- letter; the same rule as relay.store.sql.holds_key). A delivery is made only
-- for a target enabled and live at this instant. Planned as relay_ingest is:
-- as a prepared statement planned while the queue was empty, the check of a
-- key's earlier deliveries read every open delivery, and the target's join read
-- every target of the tenant for each delivery.
CREATE FUNCTION relay_insert_deliveries(
    p_ids text[], p_tenants text[], p_events text[], p_targets text[], p_keys text[],
    p_positions int8[], p_grace_s float8, p_first_delay_s float8
) RETURNS TABLE (delivery_id text, due bool)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH put AS (
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, next_attempt_at,
                                enqueued_until, order_key, order_pos)
        SELECT w.id, w.tenant_id, w.event_id, w.target_id,
               CASE WHEN w.parked THEN NULL ELSE now() + make_interval(secs => p_first_delay_s)
               END,
               CASE WHEN w.parked THEN NULL
                    ELSE now() + make_interval(secs => p_first_delay_s + p_grace_s) END,
               w.order_key, w.order_pos
        FROM (
            SELECT u.id, u.tenant_id, u.event_id, u.target_id, u.order_key, u.order_pos,
                   u.order_key IS NOT NULL AND (
                       row_number() OVER (PARTITION BY u.target_id, u.order_key
                                          ORDER BY u.order_pos) > 1
                       OR coalesce((
                           SELECT true FROM deliveries p
                           WHERE p.target_id = u.target_id AND p.order_key = u.order_key
                             AND p.status IN ('pending', 'retrying', 'dead')
                             AND (p.status <> 'dead' OR live.on_dead = 'block')
                           LIMIT 1
                       ), false)
                   ) AS parked
            FROM unnest(p_ids, p_tenants, p_events, p_targets, p_keys, p_positions)
                 AS u(id, tenant_id, event_id, target_id, order_key, order_pos)
            CROSS JOIN LATERAL (
                SELECT t.on_dead FROM targets t
                WHERE t.id = u.target_id AND t.tenant_id = u.tenant_id AND t.enabled
                  AND t.deleted_at IS NULL
                LIMIT 1
            ) live
        ) w
        RETURNING deliveries.id, deliveries.next_attempt_at IS NOT NULL
    )
    SELECT * FROM put;
END
$fn$;
