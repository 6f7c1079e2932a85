-- A tenant's dead letters, newest first, off an index of their own (issue 24:
-- each page and list keeps its cost bounded by what it shows).
--
-- The lists pin the tenant (relay/store/sql.py, pinned_order): a tenant's dead
-- letters are ordered (tenant_id, id DESC), which only an index leading with the
-- tenant serves. deliveries_dead_idx leads with (tenant_id, target_id) and serves a
-- target's; deliveries_tenant_idx serves the tenant's too, but reads past its
-- deliveries still to be sent (a target down for a day: every one of its retries).
-- Partial: only dead rows are in it, so sending deliveries never touches it.

CREATE INDEX deliveries_dead_tenant_idx ON deliveries_open (tenant_id, id DESC)
    WHERE status = 'dead';
