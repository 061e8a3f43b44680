"""The garbage collector in a long-running, latency-bound process.

CPython's cyclic collector walks every tracked object in a full (generation 2) collection. A
server that has loaded torch, the network, the text encoder and a store holds several hundred
thousand such objects, and a full collection then holds the GIL, stopping the event loop and
every other Python thread, for 0.3–0.5 s (measured with ``gc.callbacks`` during a
2,000-comparison LLMFAO replay: 14 full collections, 3.4 s in all, the longest 0.41 s). A
Select caught in one answers late, and a store read in flight can overrun its
``store.select_timeout_ms`` budget although the store answered in time (the Select then
answers degraded).

:func:`freeze_long_lived` moves everything alive after start-up into the permanent generation
(``gc.freeze``, Python ≥ 3.7): full collections then walk only what was allocated since, so
they are short (the same replay, frozen once its data was loaded: in the replay loop no
collection over 0.1 s, the longest full one 3 ms). The cost: a reference cycle among frozen
objects is not collected until :func:`thaw`; the server and the replay thaw when they stop.
"""

from __future__ import annotations

import gc
import time

import structlog

log = structlog.get_logger(__name__)


def freeze_long_lived() -> int:
    """Collect once, then freeze every object alive now (``gc.collect(); gc.freeze()``).

    Call after start-up (models loaded, caches warm) and after loading long-lived data; may be
    called again (each call freezes what has accumulated since).

    Returns:
        The number of objects in the permanent generation afterwards.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "long-lived objects frozen",
        objects=frozen,
        took_ms=round((time.perf_counter() - started) * 1000.0, 1),
    )
    return frozen


def thaw() -> None:
    """Undo :func:`freeze_long_lived` (``gc.unfreeze``): for a server or replay that ends
    while its process goes on (tests, an embedded server), so that what it froze can be
    collected. It thaws the whole process: another server still running in it goes back to
    slower full collections (never to wrong answers)."""
    gc.unfreeze()
