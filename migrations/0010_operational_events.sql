-- Operational events (issue 22): the relay tells a tenant about its own targets
-- and deliveries, through targets of kind 'operational'.
--
-- An operational event is an event row (operational = true, no source) whose
-- payload is the seed's envelope plus "data", and one pending delivery per
-- enabled operational target of the tenant whose filter matches it. Both are
-- written by emit_operational, called in the transaction of the change it
-- reports (a breaker opening, a delivery dying...), so none is lost and none
-- is sent for a change that was rolled back; the delivery engine then sends,
-- signs, retries and dead-letters them like any other delivery. Nothing is
-- emitted about an operational target (no loops). The rows go with the events'
-- retention (housekeeping deletes old events; their deliveries cascade).

ALTER TABLE targets ADD COLUMN kind text NOT NULL DEFAULT 'events'
    CHECK (kind IN ('events', 'operational'));
CREATE INDEX targets_operational_idx ON targets (tenant_id)
    WHERE kind = 'operational' AND enabled AND deleted_at IS NULL;

ALTER TABLE events ADD COLUMN operational boolean NOT NULL DEFAULT false;
-- GET /v1/operational-events and the console: a tenant's, newest first.
CREATE INDEX events_operational_idx ON events (tenant_id, id DESC) WHERE operational;

-- RFC 3339 in UTC with milliseconds, as the API shows timestamps.
CREATE FUNCTION relay_rfc3339(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- A ULID (48 bits of milliseconds, 80 random bits, Crockford base32), as the
-- application's ids (relay.core.crypto.new_id): time-sortable among them.
CREATE FUNCTION relay_ulid() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    us bigint := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    rnd bytea := uuid_send(gen_random_uuid());
    bits bit(130);
    out text := '';
BEGIN
    -- the time in ms, then the microsecond within it (10 bits: ids made one after the
    -- other in one millisecond sort as they were made), then 70 random bits: bytes
    -- 0-5 and 10-13 of a version 4 UUID are random (6 and 8 hold its tags)
    bits := B'00' || (us / 1000)::bit(48) || (us % 1000)::bit(10)
        || substring(('x' || encode(substring(rnd FROM 1 FOR 6)
                                    || substring(rnd FROM 11 FOR 4), 'hex'))::bit(80) FROM 1 FOR 70);
    FOR i IN 0..25 LOOP
        out := out || substr(alphabet, substring(bits FROM i * 5 + 1 FOR 5)::int + 1, 1);
    END LOOP;
    RETURN out;
END
$$;

-- Store one operational event of a tenant and its deliveries; returns its id.
CREATE FUNCTION emit_operational(
    p_tenant text, p_object_type text, p_action text, p_object_id text, p_data jsonb
) RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id constant text := 'evt_' || relay_ulid();
    v_uuid constant text := gen_random_uuid()::text;
    v_date constant text := relay_rfc3339(now());
BEGIN
    INSERT INTO events (id, tenant_id, source_id, upstream_uuid, upstream_date, object_type,
                        action, object_id, upstream_tenant_id, payload, operational)
    VALUES (
        v_id, p_tenant, NULL, v_uuid, v_date, p_object_type, p_action, p_object_id, p_tenant,
        convert_to(format(
            '{"uuid":%s,"date":%s,"objectType":%s,"action":%s,"objectId":%s,"tenantId":%s,"data":%s}',
            to_json(v_uuid), to_json(v_date), to_json(p_object_type), to_json(p_action),
            to_json(p_object_id), to_json(p_tenant), coalesce(p_data, '{}'::jsonb)
        ), 'UTF8'),
        true
    );
    -- due now; nobody carries them yet, so the sweeper wakes their targets at once
    INSERT INTO deliveries (id, tenant_id, event_id, target_id, next_attempt_at, enqueued_until)
    SELECT 'dlv_' || relay_ulid(), p_tenant, v_id, t.id, now(), now()
    FROM targets t
    WHERE t.tenant_id = p_tenant AND t.kind = 'operational' AND t.enabled
      AND t.deleted_at IS NULL
      AND (cardinality(t.filter_object_types) = 0
           OR lower(p_object_type) IN (SELECT lower(f) FROM unnest(t.filter_object_types) f))
      AND (cardinality(t.filter_actions) = 0
           OR lower(p_action) IN (SELECT lower(f) FROM unnest(t.filter_actions) f));
    RETURN v_id;
END
$$;

-- A delivery died (its last attempt, its window ended under an open breaker, a
-- 410): Delivery dead; and when its ordered target blocks on dead letters, the
-- key is held: Target key_blocked. Not for a deleted target (the tenant did it)
-- nor an operational one (no loops).
CREATE FUNCTION operational_on_death() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    SELECT kind, deleted_at, ordering, on_dead INTO t FROM targets WHERE id = NEW.target_id;
    IF NOT FOUND OR t.kind <> 'events' OR t.deleted_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    PERFORM emit_operational(
        NEW.tenant_id, 'Delivery', 'dead', NEW.id,
        jsonb_build_object(
            'event_id', NEW.event_id, 'target_id', NEW.target_id,
            'attempts', NEW.attempt_count, 'last_status_code', NEW.last_status_code,
            'last_error', NEW.last_error
        )
    );
    IF t.ordering = 'object' AND t.on_dead = 'block' AND NEW.order_key IS NOT NULL THEN
        PERFORM emit_operational(
            NEW.tenant_id, 'Target', 'key_blocked', NEW.target_id,
            jsonb_build_object('key', NEW.order_key, 'delivery_id', NEW.id)
        );
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_operational_death AFTER UPDATE OF status ON deliveries
    FOR EACH ROW WHEN (NEW.status = 'dead' AND OLD.status IS DISTINCT FROM 'dead')
    EXECUTE FUNCTION operational_on_death();

-- A target's breaker opened (from closed) or closed again.
CREATE FUNCTION operational_on_breaker() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t record;
    was text := 'closed';
BEGIN
    IF TG_OP = 'UPDATE' THEN
        was := OLD.breaker;
    END IF;
    SELECT tenant_id, url, kind, deleted_at INTO t FROM targets WHERE id = NEW.target_id;
    IF NOT FOUND OR t.kind <> 'events' OR t.deleted_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    IF NEW.breaker = 'open' AND was = 'closed' THEN
        PERFORM emit_operational(
            t.tenant_id, 'Target', 'circuit_opened', NEW.target_id,
            jsonb_strip_nulls(jsonb_build_object(
                'url', t.url, 'reason', NEW.reason, 'until', relay_rfc3339(NEW.open_until)
            ))
        );
    ELSIF NEW.breaker = 'closed' AND was <> 'closed' THEN
        PERFORM emit_operational(
            t.tenant_id, 'Target', 'circuit_closed', NEW.target_id,
            jsonb_build_object('url', t.url)
        );
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER target_health_operational_insert AFTER INSERT ON target_health
    FOR EACH ROW WHEN (NEW.breaker = 'open')
    EXECUTE FUNCTION operational_on_breaker();
CREATE TRIGGER target_health_operational_update AFTER UPDATE ON target_health
    FOR EACH ROW WHEN (NEW.breaker IS DISTINCT FROM OLD.breaker)
    EXECUTE FUNCTION operational_on_breaker();
