"""The gateway's aiohttp application: app factory, server limits, OpenAPI document, app keys."""
