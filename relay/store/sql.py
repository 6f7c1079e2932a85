"""SQL shared by the store modules: keyset pages, partial updates and named fragments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def keyset_page(rows: Sequence[Any], limit: int) -> tuple[list[Any], str | None]:
    """Rows fetched with ``LIMIT limit + 1`` -> (the page, the next cursor or None)."""
    if len(rows) > limit:
        return list(rows[:limit]), rows[limit - 1]["id"]
    return list(rows), None


def set_clause(
    changes: Mapping[str, Any], allowed: frozenset[str], *, first_param: int
) -> tuple[str, list[Any]]:
    """``col = $n, …`` for a PATCH; column names come only from ``allowed``."""
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    parts = [f"{column} = ${first_param + i}" for i, column in enumerate(changes)]
    return ", ".join([*parts, "updated_at = now()"]), list(changes.values())
