-- When each delivery died, kept apart from its current status (issue 23).
--
-- The console's chart counts deaths per minute. Counting deliveries whose
-- status is 'dead' now rewrote history: a replayed dead letter vanished from
-- the minute it died in. A trigger records every death, whatever made it (a
-- last attempt, an open breaker past the schedule, the deletion of its
-- target), in the same transaction; replays, retries and purges leave these
-- rows alone. The sweeper deletes them past RELAY_RETENTION_DAYS.

CREATE TABLE delivery_deaths (
    delivery_id text NOT NULL,
    tenant_id text NOT NULL,
    target_id text NOT NULL,
    died_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_deaths_died_at_idx ON delivery_deaths (died_at);
CREATE INDEX delivery_deaths_tenant_idx ON delivery_deaths (tenant_id, died_at);

CREATE FUNCTION record_delivery_death() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO delivery_deaths (delivery_id, tenant_id, target_id)
    VALUES (NEW.id, NEW.tenant_id, NEW.target_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_death AFTER UPDATE OF status ON deliveries
    FOR EACH ROW WHEN (NEW.status = 'dead' AND OLD.status IS DISTINCT FROM 'dead')
    EXECUTE FUNCTION record_delivery_death();
