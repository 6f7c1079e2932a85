"""The relay command: serve, worker, migrate, dev, tenants, dlq."""
