-- A test event (POST /v1/targets/{id}/test) comes from no source.
ALTER TABLE events ALTER COLUMN source_id DROP NOT NULL;

-- Dead letters replayed by time select on created_at; auto-disable scans failing targets.
CREATE INDEX deliveries_dead_created_idx ON deliveries (tenant_id, created_at)
    WHERE status = 'dead';
CREATE INDEX targets_failing_idx ON targets (failing_since)
    WHERE enabled AND failing_since IS NOT NULL AND deleted_at IS NULL;
