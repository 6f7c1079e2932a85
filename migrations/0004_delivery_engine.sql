-- The delivery engine (workers/engine.py): a per-target concurrency cap, a
-- circuit breaker per target, and indexes that serve one target at a time.

-- At most this many attempts to the target are in flight at once, across
-- every worker process (counted from the leases in Postgres).
ALTER TABLE targets ADD COLUMN max_in_flight integer NOT NULL DEFAULT 10
    CHECK (max_in_flight BETWEEN 1 AND 1000);

-- What the engine knows of a target's health, apart from the target row so
-- that attempts never write (or lock) the row the API edits. A target with
-- no row here is healthy. Written at most once per recorded batch.
CREATE TABLE target_health (
    target_id             text PRIMARY KEY REFERENCES targets (id) ON DELETE CASCADE,
    breaker               text NOT NULL DEFAULT 'closed'
                          CHECK (breaker IN ('closed', 'open', 'half_open')),
    -- timeouts, connection errors and 5xx in a row (a success resets it)
    consecutive_failures  integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    -- how many times in a row the breaker opened: the open period doubles
    opened_count          integer NOT NULL DEFAULT 0 CHECK (opened_count >= 0),
    open_until            timestamptz,
    reason                text,
    changed_at            timestamptz NOT NULL DEFAULT now(),
    -- the sweeper woke this target and leaves it to that wake-up until then
    swept_until           timestamptz
);

-- A target's waiting deliveries in the order they fall due (the engine's claim).
CREATE INDEX deliveries_target_due_idx ON deliveries (target_id, next_attempt_at)
    WHERE status IN ('pending', 'retrying');
-- Deliveries nobody carries (no lease, no message, no timer) are those past
-- enqueued_until: the sweeper probes one index entry per target.
CREATE INDEX deliveries_target_unsent_idx ON deliveries (target_id, enqueued_until)
    WHERE status IN ('pending', 'retrying');
-- The leases a target holds: the per-target cap counts them.
CREATE INDEX deliveries_leased_idx ON deliveries (target_id, locked_until)
    WHERE locked_until IS NOT NULL;
-- Replaced by the per-target index above.
DROP INDEX deliveries_due_idx;

-- From now on enqueued_until is never NULL while a delivery waits.
UPDATE deliveries SET enqueued_until = coalesce(enqueued_until, next_attempt_at)
    WHERE status IN ('pending', 'retrying') AND enqueued_until IS NULL;
