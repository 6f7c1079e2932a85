"""Connection pools: opened with retries on transient faults, JSON codecs installed."""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import asyncpg
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

#: A row as asyncpg returns it (``asyncpg.Record``): read by column name.
Record = Mapping[str, Any]


class Queries(Protocol):
    """What a store function needs to run statements: a pool or a connection will do.

    asyncpg ships no type information, so these protocols say which of its
    methods the relay uses and what they return.
    """

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]: ...

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Record | None: ...

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any: ...


class Conn(Queries, Protocol):
    """One connection (``asyncpg.Connection`` or a pool's proxy): statements and transactions."""

    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> AbstractAsyncContextManager[Any]: ...

    async def close(self, *, timeout: float | None = None) -> None: ...

    def terminate(self) -> None: ...


class Acquiring(Protocol):
    """``pool.acquire()``: awaited for a connection, or entered as a context."""

    def __await__(self) -> Generator[Any, None, Conn]: ...

    async def __aenter__(self) -> Conn: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Pool(Queries, Protocol):
    """A pool of connections (``asyncpg.Pool``)."""

    def acquire(self, *, timeout: float | None = None) -> Acquiring: ...

    async def release(self, connection: Conn, *, timeout: float | None = None) -> None: ...

    async def close(self) -> None: ...


#: Faults worth waiting out at start (Postgres still booting, a restart).
TRANSIENT = (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)
#: Postgres unreachable, going away or out of a resource, as opposed to a fault of the
#: statement: a connection refused or reset, a Unix socket gone (OSError,
#: TimeoutError), a backend terminated, a server shutting down, out of shared memory
#: (answered 503 with Retry-After, never 500).
POSTGRES_DOWN = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    # Postgres short of a resource (class 53: out of shared memory, e.g. a full lock
    # table, out of memory, disk full, too many connections): try again shortly.
    asyncpg.exceptions.InsufficientResourcesError,
    # A connection whose protocol was left mid-operation: Postgres went away
    # between a query's result and its ReadyForQuery (seen at a fast shutdown).
    asyncpg.InternalClientError,
)


class MaybeCommitted(Exception):
    """A transaction's COMMIT was sent, and then something failed: it may have taken effect.

    Raised from the failure (its ``__cause__``): a lost connection, a timeout or an
    error in answer to the COMMIT, or a fault after it. Writing the same rows again
    could store them twice.
    """


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection that is not reset when it goes back to its pool.

    asyncpg's default reset (``RESET ALL``, ``UNLISTEN *``, advisory unlocks…)
    costs a round trip at every release, and the relay keeps no session state
    on pooled connections: no LISTEN, no session settings, no session-level
    advisory locks (the sweeper's lock lives on a connection of its own). An
    open transaction is still rolled back by asyncpg.
    """

    def get_reset_query(self) -> str:
        return ""


async def _init_connection(conn: Any) -> None:  # asyncpg.Connection
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


#: Every connection's transactions read committed, whatever the database's default:
#: claims and records take a lock and then read, in a later statement, what the
#: lock's previous holder committed (a snapshot per statement).
SESSION = {
    "default_transaction_isolation": "read committed",
    # the ingest sends its big arrays as literals (relay/store/sql.text_array), where a
    # bare NULL is SQL NULL only with array_nulls on (Postgres's default, but a role's
    # or a database's setting could turn it off, and every uuid-less event would then
    # have the uuid 'NULL')
    "array_nulls": "on",
}


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    wait_s: float = 30.0,
    command_timeout: float | None = None,
) -> Pool:
    """Open a pool, retrying for up to ``wait_s`` while Postgres is unreachable.

    ``command_timeout``: a statement not answered in time raises ``TimeoutError`` (asyncpg
    cancels it, and closes the connection if the cancel is not answered in time either).
    """
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        stop=stop_after_delay(wait_s),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    ):
        with attempt:
            pool: Pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                connection_class=PooledConnection,
                command_timeout=command_timeout,
                server_settings=SESSION,
            )
            return pool
    raise AssertionError("unreachable")  # pragma: no cover


async def connect(
    dsn: str,
    *,
    wait_s: float = 30.0,
    command_timeout: float | None = None,
    application_name: str | None = None,
) -> Conn:
    """One connection, with the same retries and codecs as a pool."""
    server_settings = {
        **SESSION,
        **({"application_name": application_name} if application_name else {}),
    }
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        stop=stop_after_delay(wait_s),
        reraise=True,
    ):
        with attempt:
            conn: Conn = await asyncpg.connect(
                dsn, command_timeout=command_timeout, server_settings=server_settings
            )
            await _init_connection(conn)
            return conn
    raise AssertionError("unreachable")  # pragma: no cover


#: How many times a statement that met a moved row is made again.
MOVED_TRIES = 5


async def fetch_past_moves(conn: Conn, query: str, *args: Any) -> list[Record]:
    """``conn.fetch(query, *args)`` in a savepoint, made again if it met a moved row.

    A delivery that succeeds moves from deliveries_open to deliveries_sent
    (migration 0012). A statement waiting for such a row's lock is not given the
    row as it is after the move (as for an UPDATE in place): Postgres raises
    serialization_failure. Made again, in read committed, the statement sees
    where the row went (and, as a rule, that it no longer matches). Call with
    the statements that may wait for a delivery being recorded.
    """
    for attempt in range(MOVED_TRIES):
        try:
            async with conn.transaction():
                return await conn.fetch(query, *args)
        except asyncpg.SerializationError:
            if attempt == MOVED_TRIES - 1:
                raise
            log.info("a delivery moved under the statement; making it again")
    raise AssertionError("unreachable")
