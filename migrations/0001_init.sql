-- The whole product's schema. Every tenant-owned row carries tenant_id, and
-- every query of the API filters on it (relay/store/).

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a key is kept; the key itself is shown once.
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id),
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id, id DESC);

-- Secrets are AES-GCM ciphertexts (relay/crypto.py), never plaintext.
-- Rows are soft-deleted so that events and deliveries keep their history.
CREATE TABLE sources (
    id                   text PRIMARY KEY,
    tenant_id            text NOT NULL REFERENCES tenants (id),
    name                 text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    auth_type            text NOT NULL
                         CHECK (auth_type IN ('token', 'basic', 'hmac', 'standard-webhooks')),
    auth_config          jsonb NOT NULL DEFAULT '{}'::jsonb,
    secret_enc           bytea NOT NULL,
    previous_secret_enc  bytea,
    secret_rotated_at    timestamptz,
    rate_limit           integer CHECK (rate_limit > 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
CREATE INDEX sources_tenant_idx ON sources (tenant_id, id DESC) WHERE deleted_at IS NULL;

CREATE TABLE targets (
    id                   text PRIMARY KEY,
    tenant_id            text NOT NULL REFERENCES tenants (id),
    url                  text NOT NULL CHECK (length(url) <= 2048),
    description          text,
    filter_object_types  text[] NOT NULL DEFAULT '{}',
    filter_actions       text[] NOT NULL DEFAULT '{}',
    source_ids           text[],
    headers              jsonb NOT NULL DEFAULT '{}'::jsonb,
    rate_limit           integer CHECK (rate_limit > 0),
    enabled              boolean NOT NULL DEFAULT true,
    disabled_reason      text,
    secret_enc           bytea NOT NULL,
    previous_secret_enc  bytea,
    secret_rotated_at    timestamptz,
    -- when the target's current streak of failures began (auto-disable)
    failing_since        timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
CREATE INDEX targets_tenant_idx ON targets (tenant_id, id DESC) WHERE deleted_at IS NULL;

-- payload holds the exact bytes received (or, for a batch element, its
-- compact JSON), so a delivery forwards them byte for byte.
CREATE TABLE events (
    id                  text PRIMARY KEY,
    tenant_id           text NOT NULL REFERENCES tenants (id),
    source_id           text NOT NULL REFERENCES sources (id),
    upstream_uuid       text,
    upstream_date       text,
    object_type         text,
    action              text,
    object_id           text,
    upstream_tenant_id  text,
    payload             bytea NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now()
);
-- De-duplication: NULL uuids are distinct, so events without one never collide.
CREATE UNIQUE INDEX events_source_uuid_key ON events (source_id, upstream_uuid);
CREATE INDEX events_tenant_idx ON events (tenant_id, id DESC);
CREATE INDEX events_received_idx ON events (received_at);

CREATE TABLE deliveries (
    id                text PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES tenants (id),
    event_id          text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    target_id         text NOT NULL REFERENCES targets (id),
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'retrying', 'succeeded', 'dead')),
    attempt_count     integer NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    next_attempt_at   timestamptz,
    -- a worker holds the delivery until then (claim lease)
    locked_until      timestamptz,
    -- a broker message is believed in flight until then (sweeper skips it)
    enqueued_until    timestamptz,
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((status IN ('pending', 'retrying')) = (next_attempt_at IS NOT NULL))
);
-- The sweeper's and the claim's hot query: due deliveries.
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at)
    WHERE status IN ('pending', 'retrying');
CREATE INDEX deliveries_dead_idx ON deliveries (tenant_id, target_id, id DESC)
    WHERE status = 'dead';
CREATE INDEX deliveries_dead_all_idx ON deliveries (id DESC) WHERE status = 'dead';
CREATE INDEX deliveries_tenant_idx ON deliveries (tenant_id, id DESC);
CREATE INDEX deliveries_event_idx ON deliveries (event_id);
CREATE INDEX deliveries_target_idx ON deliveries (target_id, id DESC);

CREATE TABLE attempts (
    id             text PRIMARY KEY,
    tenant_id      text NOT NULL REFERENCES tenants (id),
    delivery_id    text NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    started_at     timestamptz NOT NULL,
    duration_ms    integer NOT NULL CHECK (duration_ms >= 0),
    status_code    integer,
    error          text,
    response_body  text
);
CREATE INDEX attempts_delivery_idx ON attempts (delivery_id, id);
