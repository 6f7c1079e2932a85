-- Retention whose cost does not grow with volume (issue 24, item 2).
--
-- events, deliveries and attempts become partitioned tables, so that retention
-- drops whole partitions instead of deleting rows:
--
--   events      RANGE (id): one partition per UTC day, events_pYYYYMMDD
--   attempts    RANGE (id): attempts_pYYYYMMDD
--   deliveries  LIST (status):
--     deliveries_open  ('pending', 'retrying', 'dead'): what is still to be sent,
--                      and dead letters; small, and every hot statement's table
--     deliveries_sent  ('succeeded'), RANGE (id): deliveries_sent_pYYYYMMDD
--
-- Ids are ULIDs whose first ten characters are their creation time (see
-- relay_ulid_floor below), so a range of ids is a range of time and every
-- statement that names a row by id (the claim's join to its event, the record
-- of an attempt, the API's reads) prunes to the one partition holding it. The
-- statements that look for what is to be sent (claims, the sweeper, ordered
-- keys, dead letters) say status IN ('pending', 'retrying'[, 'dead']) and prune
-- to deliveries_open alone. A delivery moves to deliveries_sent when it
-- succeeds (an UPDATE of the partition key: Postgres moves the row).
--
-- Retention (relay/store/housekeeping.py, purge_old_events) drops a day's
-- partitions once the whole day is past RELAY_RETENTION_DAYS. What is still to
-- be sent is never in a dropped partition: its delivery is in deliveries_open,
-- and its event and attempts are moved to the DEFAULT partitions first (a few
-- rows). The DEFAULT partitions also catch a row made for a day whose partition
-- does not exist yet (the sweeper and `relay migrate` make them days ahead);
-- making that day's partition later moves such rows into it.
--
-- Partitioned tables cannot keep UNIQUE (source_id, upstream_uuid) without the
-- partition key: the ingest takes an advisory lock per (source, uuid bucket)
-- and inserts an event only if no stored event of its source has its uuid (an
-- index probe per partition). The de-duplication window is the events' own
-- retention: a uuid is a duplicate while its first event is stored.
--
-- The foreign keys between these three tables (and their ON DELETE CASCADE)
-- go: a partitioned table cannot be referenced without its partition key, and
-- rows are removed by dropping partitions in step. Their keys to tenants,
-- sources and targets stay.
--
-- The conversion is generic: the new tables are made LIKE the old ones (so
-- columns added by other migrations come along), rows are copied, and every
-- user trigger of the old tables is made again on the new parent.

-- --- ULID helpers ---------------------------------------------------------------

-- The lowest id of type ``prefix`` that can have been made at or after ``at``
-- (relay.store.console.floor_id in SQL).
CREATE FUNCTION relay_ulid_floor(prefix text, at timestamptz) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    ms bigint := floor(extract(epoch FROM at) * 1000);
    alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    encoded text := '';
BEGIN
    FOR i IN 1..10 LOOP
        encoded := substr(alphabet, (ms % 32)::int + 1, 1) || encoded;
        ms := ms / 32;
    END LOOP;
    RETURN prefix || '_' || encoded || repeat('0', 16);
END
$$;

-- When an id was made (NULL if it is not prefix_ULID).
CREATE FUNCTION relay_ulid_time(id text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    encoded text := substr(id, strpos(id, '_') + 1, 10);
    ms bigint := 0;
    digit int;
BEGIN
    IF length(encoded) < 10 THEN
        RETURN NULL;
    END IF;
    FOR i IN 1..10 LOOP
        digit := strpos(alphabet, substr(encoded, i, 1));
        IF digit = 0 THEN
            RETURN NULL;
        END IF;
        ms := ms * 32 + digit - 1;
    END LOOP;
    RETURN to_timestamp(ms / 1000.0);
END
$$;

-- Make the partition of ``parent`` for the UTC day ``day`` if it is missing;
-- true if it was made. Rows the DEFAULT partition caught for that day move
-- into it. It is made apart and then attached (ATTACH takes a SHARE UPDATE
-- EXCLUSIVE lock on the parent: inserts go on meanwhile).
CREATE FUNCTION relay_ensure_partition(parent text, prefix text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := parent || '_p' || to_char(day, 'YYYYMMDD');
    lo text := relay_ulid_floor(prefix, day::timestamp AT TIME ZONE 'UTC');
    hi text := relay_ulid_floor(prefix, (day + 1)::timestamp AT TIME ZONE 'UTC');
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
                   ' INCLUDING STORAGE)', part, parent);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (id >= %L AND id < %L)',
                   part, part || '_range', lo, hi);
    IF to_regclass(parent || '_default') IS NOT NULL THEN
        -- no row may land in the DEFAULT partition between the move and the attach
        -- (inserts that go there wait; those to other partitions go on)
        EXECUTE format('LOCK TABLE %I IN EXCLUSIVE MODE', parent || '_default');
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE id >= %L AND id < %L RETURNING *)'
                       ' INSERT INTO %I SELECT * FROM moved',
                       parent || '_default', lo, hi, part);
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_range');
    RETURN true;
END
$$;

-- --- the conversion --------------------------------------------------------------

-- What must be made again on the new tables: user triggers, and foreign keys to
-- tables other than these three.
CREATE TEMP TABLE relay_redo ON COMMIT DROP AS
SELECT pg_get_triggerdef(tg.oid) AS statement
FROM pg_trigger tg
WHERE tg.tgrelid IN ('events'::regclass, 'deliveries'::regclass, 'attempts'::regclass)
  AND NOT tg.tgisinternal
UNION ALL
SELECT format('ALTER TABLE %s ADD CONSTRAINT %I %s', c.conrelid::regclass, c.conname,
              pg_get_constraintdef(c.oid))
FROM pg_constraint c
WHERE c.contype = 'f'
  AND c.conrelid IN ('events'::regclass, 'deliveries'::regclass, 'attempts'::regclass)
  AND c.confrelid NOT IN ('events'::regclass, 'deliveries'::regclass, 'attempts'::regclass);

-- Sequences owned by a column of the old tables outlive them.
DO $$
DECLARE
    seq record;
BEGIN
    FOR seq IN
        SELECT d.objid::regclass AS name FROM pg_depend d
        WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'a'
          AND d.refobjid IN ('events'::regclass, 'deliveries'::regclass, 'attempts'::regclass)
          AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'S'
    LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNED BY NONE', seq.name);
    END LOOP;
END
$$;

ALTER TABLE events RENAME TO events_unpartitioned;
ALTER TABLE deliveries RENAME TO deliveries_unpartitioned;
ALTER TABLE attempts RENAME TO attempts_unpartitioned;

CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                     INCLUDING STORAGE INCLUDING GENERATED INCLUDING IDENTITY INCLUDING COMMENTS)
    PARTITION BY RANGE (id);
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE TABLE attempts (LIKE attempts_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                       INCLUDING STORAGE INCLUDING GENERATED INCLUDING IDENTITY
                       INCLUDING COMMENTS)
    PARTITION BY RANGE (id);
CREATE TABLE attempts_default PARTITION OF attempts DEFAULT;

CREATE TABLE deliveries (LIKE deliveries_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                         INCLUDING STORAGE INCLUDING GENERATED INCLUDING IDENTITY
                         INCLUDING COMMENTS)
    PARTITION BY LIST (status);
-- Updated in place by claims and records: room on each page for HOT updates.
CREATE TABLE deliveries_open PARTITION OF deliveries FOR VALUES IN ('pending', 'retrying', 'dead')
    WITH (fillfactor = 80);
CREATE TABLE deliveries_sent PARTITION OF deliveries FOR VALUES IN ('succeeded')
    PARTITION BY RANGE (id);
CREATE TABLE deliveries_sent_default PARTITION OF deliveries_sent DEFAULT;

-- Days from the oldest row to three days ahead.
DO $$
DECLARE
    first_day date := least(
        (SELECT min(relay_ulid_time(id)) FROM events_unpartitioned),
        (SELECT min(relay_ulid_time(id)) FROM deliveries_unpartitioned),
        (SELECT min(relay_ulid_time(id)) FROM attempts_unpartitioned),
        now()
    ) AT TIME ZONE 'UTC';
    day date;
BEGIN
    day := first_day;
    WHILE day <= (now() AT TIME ZONE 'UTC')::date + 3 LOOP
        PERFORM relay_ensure_partition('events', 'evt', day);
        PERFORM relay_ensure_partition('deliveries_sent', 'dlv', day);
        PERFORM relay_ensure_partition('attempts', 'att', day);
        day := day + 1;
    END LOOP;
END
$$;

INSERT INTO events SELECT * FROM events_unpartitioned;
INSERT INTO deliveries SELECT * FROM deliveries_unpartitioned;
INSERT INTO attempts SELECT * FROM attempts_unpartitioned;

DROP TABLE attempts_unpartitioned, deliveries_unpartitioned, events_unpartitioned;

-- --- indexes ------------------------------------------------------------------------

ALTER TABLE events ADD PRIMARY KEY (id);
CREATE INDEX events_tenant_idx ON events (tenant_id, id DESC);
-- De-duplication's probe (the ingest's advisory lock makes it unique).
CREATE INDEX events_source_uuid_idx ON events (source_id, upstream_uuid)
    WHERE upstream_uuid IS NOT NULL;

ALTER TABLE attempts ADD PRIMARY KEY (id);
CREATE INDEX attempts_delivery_idx ON attempts (delivery_id, id);

-- Every delivery: by id, by tenant, by event, by target (the API's lists).
ALTER TABLE deliveries ADD PRIMARY KEY (id, status);
CREATE INDEX deliveries_tenant_idx ON deliveries (tenant_id, id DESC);
CREATE INDEX deliveries_event_idx ON deliveries (event_id);
CREATE INDEX deliveries_target_idx ON deliveries (target_id, id DESC);

-- Only what is to be sent, and dead letters, have the engine's indexes: a sent
-- delivery (98 % of the rows) keeps four.
CREATE INDEX deliveries_target_due_idx ON deliveries_open (target_id, next_attempt_at)
    WHERE status IN ('pending', 'retrying');
CREATE INDEX deliveries_target_unsent_idx ON deliveries_open (target_id, enqueued_until)
    WHERE status IN ('pending', 'retrying');
CREATE INDEX deliveries_leased_idx ON deliveries_open (target_id, locked_until)
    WHERE locked_until IS NOT NULL;
CREATE INDEX deliveries_order_idx ON deliveries_open (target_id, order_key, order_pos)
    WHERE order_key IS NOT NULL;
CREATE INDEX deliveries_target_window_idx
    ON deliveries_open (target_id, (coalesce(round_started_at, created_at)))
    WHERE status IN ('pending', 'retrying') AND next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_dead_idx ON deliveries_open (tenant_id, target_id, id DESC)
    WHERE status = 'dead';
CREATE INDEX deliveries_dead_all_idx ON deliveries_open (id DESC) WHERE status = 'dead';
CREATE INDEX deliveries_dead_created_idx ON deliveries_open (tenant_id, created_at)
    WHERE status = 'dead';

-- --- triggers and foreign keys, as they were --------------------------------------

DO $$
DECLARE
    redo record;
BEGIN
    FOR redo IN SELECT statement FROM relay_redo LOOP
        EXECUTE redo.statement;
    END LOOP;
END
$$;

ANALYZE events;
ANALYZE deliveries;
ANALYZE attempts;
