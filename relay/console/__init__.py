"""The web console: server-rendered pages over the API's data, served at /console/."""

from relay.console.web import setup

__all__ = ["setup"]
