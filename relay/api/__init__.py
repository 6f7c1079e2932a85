"""HTTP handlers, one module per resource; no SQL here (see relay/store)."""
