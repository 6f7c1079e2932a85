-- The breaker saves attempts but never lengthens a delivery's retry window, and a
-- held delivery says what holds it (issue 20, items 7 and 8).
--
-- A delivery's retry window is the schedule's total (RELAY_RETRY_SCHEDULE) from
-- when it could first be attempted: its creation, or (set here) its last retry
-- or replay, or the moment its ordering key let it go. NULL: its created_at.
ALTER TABLE deliveries ADD COLUMN round_started_at timestamptz;

-- The sweeper ends the deliveries of a target whose breaker is open and whose
-- window has ended: one probe per such target, in the order windows began.
CREATE INDEX deliveries_target_window_idx
    ON deliveries (target_id, (coalesce(round_started_at, created_at)))
    WHERE status IN ('pending', 'retrying') AND next_attempt_at IS NOT NULL;

-- Until when a rate limit defers the target's claims (set by the engine when its
-- limiter says the window is full; it lapses by itself once the window has room
-- and nothing is deferred any more). What GET /v1/deliveries shows as
-- waiting_for "rate_limit".
ALTER TABLE target_health ADD COLUMN rate_limited_until timestamptz;
