"""A bounded, time-limited cache of store reads that a local write invalidates at once.

The per-query and per-user evidence (``server/query_evidence.py``, ``server/user_evidence.py``)
reuse a read for at most ``max_age_ms``, so that writes through other replicas are seen within
that bound, and drop it when a write goes through this replica. A read that was in flight
when the write invalidated its key must not put the older rows back: every key carries a
generation that :meth:`ReadCache.invalidate` bumps, and a read is cached only if its key's
generation did not change while it ran.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    """Least-recently-used cache of ``key → value`` read from the store.

    Args:
        max_age_ms: How long a value is reused, in ms; 0 = never cached.
        size: Keys kept at most (the least recently used are dropped; so are expired values
            at the least recently used end whenever a value is stored).
    """

    def __init__(self, max_age_ms: float, size: int) -> None:
        self.max_age_s = max_age_ms / 1000.0
        self.size = size
        # key -> (monotonic time its read started, value)
        self._values: collections.OrderedDict[K, tuple[float, V]] = collections.OrderedDict()
        # key -> (reads in flight, generation): only while a read of the key runs
        self._inflight: dict[K, list[int]] = {}
        self._epoch = 0  # bumped by clear()

    async def get(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """The cached value of ``key`` when younger than ``max_age_ms``, else ``await read()``
        (cached unless ``key`` was invalidated, or the cache cleared, while it ran).

        Raises:
            Whatever ``read`` raises (nothing is cached then).
        """
        hit = self._values.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.max_age_s:
            self._values.move_to_end(key)
            return hit[1]
        started = time.monotonic()
        flight = self._inflight.setdefault(key, [0, 0])
        flight[0] += 1
        generation, epoch = flight[1], self._epoch
        try:
            value = await read()
        finally:
            flight[0] -= 1
            if not flight[0] and self._inflight.get(key) is flight:
                del self._inflight[key]
        if self.max_age_s > 0 and flight[1] == generation and self._epoch == epoch:
            self._values[key] = (started, value)
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)
            # expired values are never used again: drop those at the cold end
            now = time.monotonic()
            while self._values and now - next(iter(self._values.values()))[0] >= self.max_age_s:
                self._values.popitem(last=False)
        return value

    def cached(self, key: K) -> bool:
        """Whether ``key`` has a value (of any age) in the cache."""
        return key in self._values

    def invalidate(self, key: K) -> None:
        """Drop ``key``'s value; a read of it still in flight is not cached."""
        self._values.pop(key, None)
        flight = self._inflight.get(key)
        if flight is not None:
            flight[1] += 1

    def clear(self) -> None:
        """Drop every value; reads in flight are not cached."""
        self._values.clear()
        self._epoch += 1
