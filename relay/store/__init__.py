"""All SQL of the relay: one module per aggregate, functions that take a connection.

Every tenant-owned query takes ``tenant_id`` first and filters on it.
"""
