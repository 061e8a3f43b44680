"""User-level splits: train the network on some users, replay or score the others.

A held-out user's votes are never seen in training, so replaying those users through a
service that serves a checkpoint trained on the rest measures how the network personalizes
for new users (the inductive setting of GMTRouter: no per-user parameters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def holdout_users(user_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """A seeded, order-independent random subset of users (about ``fraction`` of them).

    Each user is held out when a hash of ``(seed, user_id)`` falls below ``fraction``, so the
    split does not depend on file order and is the same in ``train`` and ``replay``.

    Args:
        user_ids: User ids (duplicates are fine).
        fraction: Share of users to hold out, in [0, 1].
        seed: Split seed.

    Returns:
        The held-out user ids.

    Raises:
        ValueError: ``fraction`` outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"holdout fraction (got {fraction}) must lie in [0, 1]")
    out = set()
    for u in set(user_ids):
        digest = hashlib.sha256(f"{seed}:{u}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < fraction:
            out.add(u)
    return out
