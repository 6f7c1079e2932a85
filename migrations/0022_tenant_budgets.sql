-- A tenant's budget of work on the shared relay (issue 21).
--
-- Ingest bytes, deliveries created and API requests, per second, shared by
-- every gateway process (kept in Redis); 0: none for this tenant; NULL: the relay's default
-- (RELAY_TENANT_INGEST_BYTES_PER_S, RELAY_TENANT_DELIVERIES_PER_S,
-- RELAY_TENANT_API_REQUESTS_PER_S; none unless set). A change bumps the
-- tenant's config_version, as source and target changes do, so every process
-- applies it to the next request.

ALTER TABLE tenants
    ADD COLUMN ingest_bytes_per_s bigint CHECK (ingest_bytes_per_s >= 0),
    ADD COLUMN deliveries_per_s integer CHECK (deliveries_per_s >= 0),
    ADD COLUMN api_requests_per_s integer CHECK (api_requests_per_s >= 0);
