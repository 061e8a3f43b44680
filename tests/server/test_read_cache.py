"""The evidence sources' read cache (``server/read_cache.py``): reuse within its age, and a
write through this replica is never undone by a read that was in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from server.read_cache import ReadCache


async def test_values_are_reused_until_invalidated_or_too_old() -> None:
    reads: list[str] = []

    async def read(value: str) -> str:
        reads.append(value)
        return value

    cache: ReadCache[str, str] = ReadCache(max_age_ms=60_000, size=2)
    assert await cache.get("k", lambda: read("v1")) == "v1"
    assert await cache.get("k", lambda: read("v2")) == "v1"  # cached
    cache.invalidate("k")
    assert await cache.get("k", lambda: read("v3")) == "v3"
    for key in ("x", "y"):  # size 2: "k" is the least recently used and goes
        await cache.get(key, lambda: read("other"))
    assert not cache.cached("k") and cache.cached("x") and cache.cached("y")
    never: ReadCache[str, str] = ReadCache(max_age_ms=0, size=2)
    await never.get("k", lambda: read("a"))
    assert await never.get("k", lambda: read("b")) == "b"
    assert reads == ["v1", "v3", "other", "other", "a", "b"]


async def test_a_read_in_flight_during_an_invalidation_is_not_cached() -> None:
    cache: ReadCache[str, str] = ReadCache(max_age_ms=60_000, size=10)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_old_rows() -> str:
        started.set()
        await release.wait()
        return "before the write"

    def invalidate() -> None:
        cache.invalidate("u")

    forgets: list[Callable[[], None]] = [invalidate, cache.clear]
    for forget in forgets:
        task = asyncio.ensure_future(cache.get("u", slow_old_rows))
        await started.wait()
        forget()  # a write (or DeleteUser) went through this replica meanwhile
        release.set()
        assert await task == "before the write"  # this caller gets what it read ...
        assert not cache.cached("u")  # ... but the next one reads again
        assert await cache.get("u", lambda: asyncio.sleep(0, "after")) == "after"
        cache.invalidate("u")
        started.clear()
        release.clear()


async def test_a_failed_read_caches_nothing() -> None:
    cache: ReadCache[str, str] = ReadCache(max_age_ms=60_000, size=10)

    async def broken() -> str:
        raise OSError("store down")

    for _ in range(2):  # and leaves nothing in flight behind: the next read is cached
        with pytest.raises(OSError, match="store down"):
            await cache.get("k", broken)
        assert not cache.cached("k")
    assert await cache.get("k", lambda: asyncio.sleep(0, "ok")) == "ok"
    assert cache.cached("k")
