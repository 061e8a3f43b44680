"""Shared state of online learning, kept in the graph store so that replicas share it.

* **Published model weights.** The trainer publishes each accepted fine-tuned network as a
  :class:`PublishedModel` (metadata) plus the checkpoint bytes; every replica polls
  :meth:`graphstore.store.GraphStore.latest_model` and loads a newer one. Publications are
  numbered by a store-assigned sequence ``seq`` (1, 2, …), so "newer" never depends on a
  replica's clock; the store keeps the latest :data:`KEEP_PUBLISHED` only.
* **The trainer lease.** With ``learning.role: auto`` the replicas elect one trainer by a lease
  (:meth:`graphstore.store.GraphStore.acquire_lease`): whoever holds an unexpired lease trains,
  the others only load. Expiry uses the database's clock (Neo4j ``timestamp()``) or, for the
  embedded store, the host's (all its users share one host).
"""

from __future__ import annotations

import dataclasses

#: Published models kept in the store (older ones are deleted when a new one is published).
KEEP_PUBLISHED = 3


@dataclasses.dataclass(frozen=True, slots=True)
class PublishedModel:
    """Metadata of published weights.

    Attributes:
        version: The weights' version string (``"gmtrouter-<sha256[:12]>"``).
        base_version: Version of the checkpoint file the fine-tuning started from; a replica
            only loads publications whose base is the checkpoint it was configured with.
        seq: Publication number assigned by the store (0 before publishing).
        interactions: The store's interaction count when the training data was read.
        created_at_s: Unix time of publication (seconds; informational).
        metrics: JSON text of the round's metrics (losses, accuracies, sizes).
    """

    version: str
    base_version: str
    seq: int
    interactions: int
    created_at_s: float
    metrics: str = "{}"
