"""``server/heap.py``: freezing the start-up heap out of the collector's reach, and thawing."""

from __future__ import annotations

import gc

from server.heap import freeze_long_lived, thaw


def test_freeze_moves_live_objects_out_of_the_collector_and_thaw_undoes_it() -> None:
    try:
        frozen = freeze_long_lived()
        assert frozen > 1000
        # A frozen object leaves the permanent generation only when it is freed, which other
        # threads left by earlier tests may do at any moment (a full run once saw 561,082
        # -> 561,080): the count can only fall. Objects allocated later never join it.
        assert gc.get_freeze_count() <= frozen
        before = gc.get_freeze_count()
        survivor = [object() for _ in range(10)]  # allocated after the freeze: collectable
        assert gc.get_freeze_count() <= before and survivor
    finally:
        thaw()
    assert gc.get_freeze_count() == 0
