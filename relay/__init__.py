"""Relay: a multi-tenant webhook relay."""
