-- Portal links (issue 22): one-time, expiring console sign-ins minted for a tenant.
--
-- Only the SHA-256 of a link's token is kept, as for API keys: the token is in
-- the link's URL, shown once. Opening a link is one conditional UPDATE
-- (used_at IS NULL AND expires_at > now() ... RETURNING), so of two openings
-- racing on any number of gateway processes at most one signs a browser in.
-- The console session a link makes ends at expires_at at the latest; the row
-- is read on every request of that session.

CREATE TABLE portal_links (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id),
    token_hash  bytea NOT NULL UNIQUE,
    read_only   boolean NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
-- a tenant's links that expired long ago are deleted when it mints another
CREATE INDEX portal_links_tenant_expiry_idx ON portal_links (tenant_id, expires_at);
