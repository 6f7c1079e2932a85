"""``newest_first``: a list's page read in two parts (the last day, then the days
before) is the page one read of every id below the cursor gives."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from relay.store.sql import newest_first

NOW = datetime.now(UTC)


def _id(prefix: str, hours_ago: float, serial: int) -> str:
    made = str(ULID.from_datetime(NOW - timedelta(hours=hours_ago)))[:10]
    return f"{prefix}_{made}{serial:016d}"


ids = st.lists(
    st.tuples(st.floats(min_value=-2, max_value=24 * 40), st.integers(0, 10**6)),
    max_size=40,
    unique_by=lambda t: t[1],
).map(lambda rows: sorted({_id("evt", hours, serial) for hours, serial in rows}, reverse=True))


@given(
    rows=ids,
    want=st.integers(1, 20),
    cursor=st.one_of(
        st.none(),
        st.builds(
            _id,
            st.sampled_from(["evt", "att", "dlv", "tgt"]),
            st.floats(-2, 24 * 40),
            st.integers(0, 10**6),
        ),
        st.sampled_from(["evt_x", "zzz_" + "Z" * 26, ""]),
    ),
)
def test_two_reads_give_the_page_of_one(rows: list[str], want: int, cursor: str | None) -> None:
    reads: list[tuple[str | None, str | None]] = []

    async def fetch(lo: str | None, hi: str | None, n: int) -> list[str]:
        reads.append((lo, hi))
        return [r for r in rows if (lo is None or r >= lo) and (hi is None or r < hi)][:n]

    page = asyncio.run(newest_first(fetch, "evt", cursor, want))

    assert page == [r for r in rows if cursor is None or r < cursor][:want]
    assert 1 <= len(reads) <= 2
