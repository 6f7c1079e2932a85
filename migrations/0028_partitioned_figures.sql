-- The per-minute and per-hour figures partitioned by UTC day, as the history is
-- (0012), so that retention drops their days whole (issue 24, item 2).
--
-- Retention deleted the figures past it 10,000 rows at a time: with 2 M events of
-- history to two targets that was ~1.4 M rows of latency histograms for ten days,
-- 4 s of DELETEs, the longest part of retention, and it grows with the targets a
-- relay serves (a busy target adds ~20,000 histogram rows a day). A day of figures
-- is now a partition of each table, dropped once the whole day is past the
-- retention; the DEFAULT partitions catch what falls on a day with none (and
-- retention deletes those rows, few, as before). The sweeper makes each day's
-- partitions ahead of it, with the history's.
--
-- Only the folder (fold_rollups) writes these tables; the hot path appends to the
-- *_deltas tables, which stay as they are.

-- No fold while the figures move: one that tries finds the lock taken and leaves its
-- deltas for the next tick.
SELECT pg_advisory_xact_lock(125822885983600);  -- "rollup", as fold_rollups() takes it
LOCK TABLE tenant_minutes, target_minutes, target_latency_minutes, tenant_hours
    IN ACCESS EXCLUSIVE MODE;

-- A day's partition of ``parent``, holding the rows whose ``key`` is in [lo, hi): made,
-- filled with the DEFAULT partition's rows of that day, attached. False if it exists.
CREATE FUNCTION relay_attach_day(parent text, day date, key text, lo text, hi text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    part text := parent || '_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
                   ' INCLUDING STORAGE)', part, parent);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I >= %L AND %I < %L)',
                   part, part || '_range', key, lo, key, hi);
    IF to_regclass(parent || '_default') IS NOT NULL THEN
        -- no row may land in the DEFAULT partition between the move and the attach
        -- (inserts that go there wait; those to other partitions go on)
        EXECUTE format('LOCK TABLE %I IN EXCLUSIVE MODE', parent || '_default');
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *)'
                       ' INSERT INTO %I SELECT * FROM moved',
                       parent || '_default', key, lo, key, hi, part);
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_range');
    RETURN true;
END
$$;

-- The history's days (0012's function, now one case of the above).
CREATE OR REPLACE FUNCTION relay_ensure_partition(parent text, prefix text, day date)
RETURNS boolean LANGUAGE sql AS $$
    SELECT relay_attach_day(parent, day, 'id',
                            relay_ulid_floor(prefix, day::timestamp AT TIME ZONE 'UTC'),
                            relay_ulid_floor(prefix, (day + 1)::timestamp AT TIME ZONE 'UTC'))
$$;

-- The figures' days: the rows whose time (the table's partition key) is in that UTC day.
-- (The bounds are written as text and read back: in ISO and UTC, whatever the
-- session's DateStyle and TimeZone, so that no zone abbreviation is read as another.)
CREATE FUNCTION relay_ensure_figures_partition(parent text, day date)
RETURNS boolean LANGUAGE sql SET datestyle = 'ISO, YMD' SET timezone = 'UTC' AS $$
    SELECT relay_attach_day(
        parent, day,
        (SELECT a.attname::text FROM pg_partitioned_table p
         JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
         WHERE p.partrelid = parent::regclass),
        (day::timestamp AT TIME ZONE 'UTC')::text,
        ((day + 1)::timestamp AT TIME ZONE 'UTC')::text)
$$;

-- --- the conversion --------------------------------------------------------------

DROP VIEW tenant_minutes_now, target_minutes_now, target_latency_minutes_now;

DO $$
DECLARE
    t record;
    ix record;
    today date := (now() AT TIME ZONE 'UTC')::date;
    day date;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('tenant_minutes', 'minute'), ('target_minutes', 'minute'),
                                   ('target_latency_minutes', 'minute'),
                                   ('tenant_hours', 'hour')) AS v(name, key)
    LOOP
        EXECUTE format('ALTER TABLE %I RENAME TO %I', t.name, t.name || '_unpartitioned');
        FOR ix IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                  WHERE i.indrelid = (t.name || '_unpartitioned')::regclass
        LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', ix.relname, ix.relname || '_old');
        END LOOP;
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
                       ' INCLUDING STORAGE) PARTITION BY RANGE (%I)',
                       t.name, t.name || '_unpartitioned', t.key);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', t.name || '_default', t.name);
        -- a partition for each of the last 40 days that has rows, today's, and the next
        -- three (as the sweeper makes them: housekeeping.DAYS_AHEAD); older rows (a
        -- retention longer than 40 days) go to the DEFAULT partition, where retention
        -- deletes them as before: one transaction cannot make a partition for each day of
        -- a long history (each takes locks: 400 days of four tables exhaust the lock
        -- table of a default server)
        FOR day IN EXECUTE format(
            'SELECT DISTINCT (%I AT TIME ZONE ''UTC'')::date FROM %I'
            ' WHERE %I >= now() - interval ''40 days'' AND %I < now()',
            t.key, t.name || '_unpartitioned', t.key, t.key)
        LOOP
            PERFORM relay_ensure_figures_partition(t.name, day);
        END LOOP;
        day := today;
        WHILE day <= today + 3 LOOP
            PERFORM relay_ensure_figures_partition(t.name, day);
            day := day + 1;
        END LOOP;
        EXECUTE format('INSERT INTO %I SELECT * FROM %I', t.name, t.name || '_unpartitioned');
        EXECUTE format('DROP TABLE %I', t.name || '_unpartitioned');
    END LOOP;
END
$$;

ALTER TABLE tenant_minutes ADD PRIMARY KEY (tenant_id, minute);
CREATE INDEX tenant_minutes_minute_idx ON tenant_minutes (minute);
ALTER TABLE target_minutes ADD PRIMARY KEY (target_id, minute);
CREATE INDEX target_minutes_minute_idx ON target_minutes (minute);
ALTER TABLE target_latency_minutes ADD PRIMARY KEY (target_id, minute, bucket);
CREATE INDEX target_latency_minutes_minute_idx ON target_latency_minutes (minute);
ALTER TABLE tenant_hours ADD PRIMARY KEY (tenant_id, hour);
CREATE INDEX tenant_hours_hour_idx ON tenant_hours (hour);

-- A DELETE of the parent tables is refused: the release before this one trimmed them
-- with `DELETE ... WHERE ctid IN (SELECT ctid ... LIMIT n)`, and a ctid names a row
-- only within one partition, so on a partitioned table that statement also deleted
-- today's figures. Retention now drops the days and deletes from the DEFAULT
-- partitions (a statement on a partition fires no statement trigger of its parent).
CREATE FUNCTION relay_refuse_figures_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the figures are partitioned by day (migration 0028): delete from %_default, or drop a day', TG_TABLE_NAME
        USING HINT = 'an older relay is running its retention: upgrade it';
END
$$;
CREATE TRIGGER tenant_minutes_no_delete BEFORE DELETE ON tenant_minutes
    FOR EACH STATEMENT EXECUTE FUNCTION relay_refuse_figures_delete();
CREATE TRIGGER target_minutes_no_delete BEFORE DELETE ON target_minutes
    FOR EACH STATEMENT EXECUTE FUNCTION relay_refuse_figures_delete();
CREATE TRIGGER target_latency_minutes_no_delete BEFORE DELETE ON target_latency_minutes
    FOR EACH STATEMENT EXECUTE FUNCTION relay_refuse_figures_delete();
CREATE TRIGGER tenant_hours_no_delete BEFORE DELETE ON tenant_hours
    FOR EACH STATEMENT EXECUTE FUNCTION relay_refuse_figures_delete();

-- What readers read: folded rows plus the deltas not folded yet (as 0011 made them).
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
