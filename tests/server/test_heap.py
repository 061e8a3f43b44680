"""``server/heap.py``: freezing the start-up heap out of the collector's reach, and thawing."""

from __future__ import annotations

import gc

from server.heap import freeze_long_lived, thaw


def test_freeze_moves_live_objects_out_of_the_collector_and_thaw_undoes_it() -> None:
    try:
        frozen = freeze_long_lived()
        assert frozen == gc.get_freeze_count() > 1000
        survivor = [object() for _ in range(10)]  # allocated after the freeze: collectable
        assert gc.get_freeze_count() == frozen and survivor
    finally:
        thaw()
    assert gc.get_freeze_count() == 0
