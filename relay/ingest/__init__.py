"""From a request to committed rows: parse, authenticate, guard replays, route, group commit."""
