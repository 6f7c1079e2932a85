"""A serving process's start-up objects are out of the garbage collector's passes."""

from __future__ import annotations

import gc

from relay.core import loops


def test_settle_heap_leaves_the_objects_made_so_far_out_of_full_collections() -> None:
    # Given a process's start-up objects (modules, caches: containers the collector tracks)
    made = [[n] for n in range(10_000)]  # lists: always tracked
    tracked_before = len(gc.get_objects())
    try:
        # When the process settles its heap
        loops.settle_heap()
        # Then a full collection no longer walks them: they are frozen, and what is
        # left to walk is what the process makes from now on
        assert gc.get_freeze_count() >= len(made)
        assert len(gc.get_objects()) < tracked_before - len(made)
        later = [[n] for n in range(100)]
        assert len(gc.get_objects()) >= len(later)
    finally:
        gc.unfreeze()
