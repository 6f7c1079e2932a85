"""Arrays sent as text (relay/store/sql.py): Postgres reads back exactly the values sent.

The ingest sends its big text and integer arrays as array literals, because asyncpg
encodes a list element by element with two abstract-class checks each. A literal
that lost or changed a value would store the wrong ids, keys or uuids, so every
kind of text goes through a real Postgres here: quotes, backslashes, commas,
braces, spaces, the word NULL, empty strings, non-ASCII text, and None.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.store import db
from relay.store.sql import int_array, text_array

# any text Postgres can store: no NUL, no lone surrogate
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
tricky = st.sampled_from(['"', "\\", ",", "{", "}", " ", "NULL", "null", "", '\\"', "a,b", "é"])
values = st.lists(st.one_of(st.none(), texts, tricky), max_size=30)


@pytest.fixture(scope="module")
def roundtrip(database_url: str) -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(database_url))
    loop.conn = conn  # type: ignore[attr-defined]
    try:
        yield loop
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def _fetch(loop: asyncio.AbstractEventLoop, sql: str, literal: str) -> object:
    conn = loop.conn  # type: ignore[attr-defined]
    return loop.run_until_complete(conn.fetchval(sql, literal))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values)
def test_a_text_array_comes_back_as_sent(
    roundtrip: asyncio.AbstractEventLoop, sent: list[str | None]
) -> None:
    assert _fetch(roundtrip, "SELECT $1::text::text[]", text_array(sent)) == sent


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), max_size=30))
def test_an_integer_array_comes_back_as_sent(
    roundtrip: asyncio.AbstractEventLoop, sent: list[int | None]
) -> None:
    assert _fetch(roundtrip, "SELECT $1::text::int8[]", int_array(sent)) == sent


def test_the_plain_ids_of_a_batch_take_the_short_way_and_keep_their_order(
    roundtrip: asyncio.AbstractEventLoop,
) -> None:
    ids = [f"dlv_{i:026d}" for i in range(10_000)]
    literal = text_array(ids)
    assert literal.startswith('{"dlv_') and "\\" not in literal
    assert _fetch(roundtrip, "SELECT $1::text::text[]", literal) == ids
    assert text_array([]) == "{}" and _fetch(roundtrip, "SELECT $1::text::text[]", "{}") == []


async def test_null_stays_null_where_an_operator_turned_array_nulls_off(own_database: str) -> None:
    # (a bare NULL in an array literal is the text 'NULL' when array_nulls is off; the
    # relay's connections pin it on, whatever the database's or role's default)
    admin = await asyncpg.connect(own_database)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET array_nulls = off')
    finally:
        await admin.close()
    literal = text_array([None, "u1", None])
    plain = await asyncpg.connect(own_database)
    try:
        assert await plain.fetchval("SELECT $1::text::text[]", literal) == ["NULL", "u1", "NULL"]
    finally:
        await plain.close()
    pool = await db.create_pool(own_database, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT $1::text::text[]", literal) == [None, "u1", None]
            assert await conn.fetchval("SELECT $1::text::int8[]", int_array([None, 5])) == [None, 5]
    finally:
        await pool.close()
    conn = await db.connect(own_database)
    try:
        assert await conn.fetchval("SELECT $1::text::text[]", literal) == [None, "u1", None]
    finally:
        await conn.close()
