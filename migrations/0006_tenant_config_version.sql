-- Read your writes across gateway processes and replicas (issue 20).
--
-- Every change to a tenant's sources or targets bumps its config_version in the
-- same transaction. A gateway caches a tenant's sources and routes with the
-- version they were read at, and the transaction that stores an ingest
-- request's events checks that version against the tenant's row: a request
-- routed by a stale cache stores nothing, and the gateway reads the source and
-- routes again and retries it. So a change that has answered is seen by every
-- request that starts afterwards, on any process, however late a cache learns.

ALTER TABLE tenants ADD COLUMN config_version bigint NOT NULL DEFAULT 0;
