-- A drainer's last look (relay/store/claims.py, last_look), as the worker's other
-- statements plan (0018): with sequential scans off, so that statistics taken while
-- the open deliveries were few never make it read the whole partition, and planned
-- once per connection.
--
-- A drainer whose last claim took all that was due looks, once its attempts end,
-- whether a delivery of the target is due and no one holds it (what a claim would
-- take: relay_claim's own conditions), when the next falls due, and until when its
-- breaker is open; it claims only if something is due (workers/engine.py).

CREATE FUNCTION relay_last_look(p_target text)
RETURNS TABLE (due bool, due_in float8, open_until timestamptz)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
    RETURN QUERY
    SELECT EXISTS (
               SELECT 1 FROM deliveries_open d
               WHERE d.target_id = p_target AND d.status IN ('pending', 'retrying')
                 AND d.next_attempt_at <= now()
                 AND (d.locked_until IS NULL OR d.locked_until < now())
           ),
           (SELECT extract(epoch FROM d.next_attempt_at - now())::float8 FROM deliveries_open d
            WHERE d.target_id = p_target AND d.status IN ('pending', 'retrying')
              AND d.next_attempt_at > now()
            ORDER BY d.next_attempt_at LIMIT 1),
           (SELECT h.open_until FROM target_health h
            WHERE h.target_id = p_target AND h.open_until > now());
END
$fn$;
