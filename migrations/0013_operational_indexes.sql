-- The operational events' indexes on the partitioned events table (issue 24).
--
-- 0010 indexed operational events by tenant (events_operational_idx); 0012 made
-- events a partitioned table and recreated its other indexes but not that one,
-- so GET /v1/operational-events and the console's lists read every event of the
-- tenant (or of every tenant, for the operator) to find the few operational ones:
-- with 2,000,000 events of history, the console's overview took 150 ms where it
-- took 11 ms empty. Both are partial: operational events are a sliver of events.

-- a tenant's, newest first (the API's list, a tenant's console)
CREATE INDEX IF NOT EXISTS events_operational_idx ON events (tenant_id, id DESC)
    WHERE operational;
-- every tenant's, newest first (the operator's console)
CREATE INDEX IF NOT EXISTS events_operational_recent_idx ON events (id DESC)
    WHERE operational;
