"""One hot target, drained by two worker processes, beside the durable ceiling.

    python bench/hot_target.py

Runs ``../shared/bench/durable_ratio.py`` (needs wrk, Postgres and Redis db 8, as
it does) with the relay's side of it changed: one target with ``max_in_flight``
64 (the ceiling's 64 requests in flight) instead of two with 32, and 10,000
deliveries instead of 20,000. A target's cap is shared by the worker processes
draining it (migration 0015): with one hot target, the second process helps
instead of idling. Its delivery line reads "1 target x max_in_flight 64".
"""

from __future__ import annotations

import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "durable_ratio.py"

CHANGES = [
    ('for t in ("a", "b"):', 'for t in ("a",):'),
    ('"max_in_flight": 32}', '"max_in_flight": 64}'),
    ('drained(sink, "relay", 2 * EVENTS)', 'drained(sink, "relay", EVENTS)'),
    ("max_in_flight 32 x 2 targets", "1 target x max_in_flight 64"),
]


def main() -> None:
    source = SHARED.read_text()
    for old, new in CHANGES:
        if old not in source:
            sys.exit(f"{SHARED} changed: {old!r} not found")
        source = source.replace(old, new)
    # the sink it starts is the unchanged script (it runs __file__ with "sink")
    exec(compile(source, str(SHARED), "exec"), {"__name__": "__main__", "__file__": str(SHARED)})


if __name__ == "__main__":
    main()
