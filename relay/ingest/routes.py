"""The gateway's cache of sources and routing tables, so ingest costs one transaction.

Read your writes on every process: each entry carries the tenant's
``config_version`` it was read at, and the transaction that stores a request's
events checks that version (relay/store/events.py). A request routed by an entry
that another process or replica made stale stores nothing; the gateway reads
the source and routes again and retries it (relay/api/ingest.py). So the cache's
age never decides what a request sees: entries live ``ttl`` seconds
(RELAY_CACHE_TTL_S) only to bound memory and to pick up what needs no version
(a target disabled by the worker is never routed to anyway: deliveries are
inserted only for targets enabled and live *at insert time*).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from relay.delivery.ordering import document_key, object_key
from relay.ingest.parse import ParsedEvent

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class SourceEntry:
    """What ingest needs of a source, secrets decrypted."""

    id: str
    tenant_id: str
    auth_type: str
    auth_config: dict[str, str]
    secret: str
    previous_secret: str | None
    previous_valid_until: float | None  # unix time
    rate_limit: int | None
    #: the tenant's config_version when this was read
    config_version: int = 0
    #: the tenant's budget (its own, else the relay's default; None: none)
    ingest_bytes_per_s: int | None = None
    deliveries_per_s: int | None = None


@dataclass(frozen=True)
class TargetRoute:
    """What routing needs of a target: its filters, lower-cased."""

    id: str
    object_types: frozenset[str]
    actions: frozenset[str]
    source_ids: frozenset[str] | None
    #: ordering "object": the events of one key go one at a time, in order
    ordered: bool = False
    #: the JSON pointer of the key (None: objectType and objectId)
    ordering_key: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TargetRoute:
        """A target's row (filters, sources, ordering) as routing sees it."""
        return cls(
            id=row["id"],
            object_types=frozenset(v.lower() for v in row["filter_object_types"]),
            actions=frozenset(v.lower() for v in row["filter_actions"]),
            source_ids=frozenset(row["source_ids"]) if row["source_ids"] is not None else None,
            ordered=row["ordering"] == "object",
            ordering_key=row["ordering_key"],
        )

    def order_key(self, event: ParsedEvent) -> str | None:
        """The ordering key of ``event`` at this target (None: not ordered).

        Parses the payload for a pointer: for several targets, use ``EventKeys``.
        """
        return EventKeys(event).at(self)

    def matches(self, source_id: str, object_type: str | None, action: str | None) -> bool:
        """True when an event of ``source_id`` with these fields is for this target."""
        if self.source_ids is not None and source_id not in self.source_ids:
            return False
        if self.object_types and (object_type or "").lower() not in self.object_types:
            return False
        return not self.actions or (action or "").lower() in self.actions


_UNPARSED = object()


class EventKeys:
    """One event's ordering keys at its targets: its payload parsed at most once (or
    the parse ingest already made given), each distinct pointer resolved once."""

    def __init__(self, event: ParsedEvent, document: Any = _UNPARSED) -> None:
        self._event = event
        self._document = document
        self._by_pointer: dict[str, str | None] = {}

    def at(self, route: TargetRoute) -> str | None:
        """The event's key at ``route`` (None: not ordered there)."""
        if not route.ordered:
            return None
        pointer = route.ordering_key
        if pointer is None:
            return object_key(self._event.object_type, self._event.object_id)
        if pointer not in self._by_pointer:
            if self._document is _UNPARSED:
                self._document = json.loads(self._event.payload)
            self._by_pointer[pointer] = document_key(pointer, self._document)
        return self._by_pointer[pointer]


def order_keys(
    source_id: str,
    events: Sequence[ParsedEvent],
    routes: Sequence[TargetRoute],
    documents: Sequence[Any] | None = None,
) -> list[dict[str, str]]:
    """For each event, its key at each ordered route it matches, by route id.

    Computed once per request, before its commit (the group commit only looks them
    up): ``documents``, the body's one parse (``parse_documents``), is resolved
    once per distinct pointer; without it each event's payload is parsed once.
    """
    ordered = [r for r in routes if r.ordered]
    result: list[dict[str, str]] = []
    for index, event in enumerate(events):
        keys: dict[str, str] = {}
        if ordered:
            of = EventKeys(event) if documents is None else EventKeys(event, documents[index])
            for route in ordered:
                if route.matches(source_id, event.object_type, event.action):
                    key = of.at(route)
                    if key is not None:
                        keys[route.id] = key
        result.append(keys)
    return result


@dataclass(frozen=True)
class Routes:
    """A tenant's routes, as read at its ``config_version``."""

    config_version: int
    targets: tuple[TargetRoute, ...]


class TTLCache(Generic[K, V]):
    """A small per-process cache with expiry and explicit invalidation.

    Concurrent misses of one key share one read: an entry that expires under load
    is read once, not by every request that comes while it is read (at 1,000
    events/s on a busy database, each expiry had become dozens of reads, which
    made the reads slower and the herd bigger). A read that began before a
    ``forget`` of its key answers only those who asked before it, and is not kept.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        #: the read under way of each key missed, shared by whoever asks meanwhile
        self._reading: dict[K, asyncio.Future[V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The cached value, or ``load()`` stored for ``ttl`` seconds."""
        hit = self._entries.get(key)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._read(key, load))
            # its failure is read even when every waiter went away (else asyncio logs it)
            reading.add_done_callback(_retrieve)
        # shielded: a request that goes away must not cancel the others' read
        return await asyncio.shield(reading)

    async def _read(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        began = self._clock()
        try:
            value = await load()
        finally:
            ours = self._reading.get(key) is asyncio.current_task()  # else forgotten meanwhile
            if ours:
                del self._reading[key]
        if ours and self._ttl > 0 and value is not None:  # a miss is not kept: it may exist soon
            if len(self._entries) > 100_000:
                self._entries.clear()
            self._entries[key] = (began + self._ttl, value)
        return value

    def forget(self, key: K) -> None:
        """Drop one entry, and the read of it under way (the next get reads afresh)."""
        self._entries.pop(key, None)
        self._reading.pop(key, None)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class RoutingCache:
    """Sources by id and routable targets by tenant."""

    def __init__(self, ttl_s: float) -> None:
        self.sources: TTLCache[str, SourceEntry | None] = TTLCache(ttl_s)
        self.targets: TTLCache[str, Routes] = TTLCache(ttl_s)

    def forget_source(self, source_id: str) -> None:
        """A source changed."""
        self.sources.forget(source_id)

    def forget_tenant(self, tenant_id: str) -> None:
        """One of the tenant's targets changed."""
        self.targets.forget(tenant_id)


def count_deliveries(
    source_id: str, events: Sequence[ParsedEvent], routes: Sequence[TargetRoute]
) -> int:
    """Deliveries storing ``events`` can create at most: each event (a uuid repeated
    within the body counts once) times the routes it matches."""
    seen: set[str] = set()
    total = 0
    for event in events:
        if event.uuid is not None:
            if event.uuid in seen:
                continue
            seen.add(event.uuid)
        total += sum(route.matches(source_id, event.object_type, event.action) for route in routes)
    return total
