"""The ``GraphStore`` interface: the durable interaction graph behind the router.

Two implementations: :class:`graphstore.sqlite_store.SQLiteGraphStore` (embedded, the
zero-setup default) and the Neo4j store (production). Both are async so that they fit the
``grpc.aio`` server; both are safe to share between concurrent coroutines of one process, and
both keep every piece of shared state in the database, so several server replicas may use
one store.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

from graphstore.errors import IdempotencyConflictError
from graphstore.interactions import (
    Interaction,
    PairCount,
    RecordedComparison,
    RecordResult,
    UserComparison,
)
from graphstore.neighbourhood import Neighbourhood
from graphstore.registry import PublishedModel

#: A pair count at or below this many games (on both sides) is removed by ``delete_user``.
EMPTY_PAIR_GAMES = 1e-9

#: One ``record`` call's outcome in a group commit: its results, or the conflict that
#: refused it (nothing of it written).
CallResult = list[RecordResult] | IdempotencyConflictError


def settle_call(fut: asyncio.Future[list[RecordResult]], res: CallResult) -> None:
    """Give a grouped ``record`` call (waiting on ``fut``) its results, or raise its
    :class:`~graphstore.errors.IdempotencyConflictError` there; a done future is left as is."""
    if fut.done():
        return
    if isinstance(res, IdempotencyConflictError):
        fut.set_exception(res)
    else:
        fut.set_result(res)


class GraphStore(abc.ABC):
    """Durable store of user–query–response–LLM–turn interactions.

    Errors: every method raises :class:`graphstore.errors.StoreUnavailableError` when the
    backing database cannot be reached; nothing is partially written in that case. A write
    whose commit was sent but not confirmed raises its subclass
    :class:`graphstore.errors.CommitOutcomeUnknownError` instead (the Neo4j store): it may or
    may not be stored, and repeating it is safe.
    """

    #: Query-embedding dimension ``D`` this store was opened with.
    embedding_dim: int

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create the schema (idempotently) and get ready for requests."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and release connections. Safe to call twice."""

    @abc.abstractmethod
    async def record(self, interactions: Sequence[Interaction]) -> list[RecordResult]:
        """Durably write interactions, idempotently on ``idempotency_key``.

        Returns once every interaction is durable (committed), one result per input in
        order. A retry is not written again and gets ``duplicate=True`` with the stored id:
        an interaction whose ``idempotency_key`` (or else ``interaction_id``) is stored
        already, by the same ``user_id`` and with the same content
        (:func:`~graphstore.interactions.content_fingerprint`: the timestamp, for one, may
        differ); an interaction stored before fingerprints existed is compared by user only.
        The same holds among the interactions of one call and of concurrent calls.

        Raises:
            InvalidInteractionError: a query embedding is not float32 ``[D]``.
            IdempotencyConflictError: an interaction's ``idempotency_key`` (or else its
                ``interaction_id``) is stored already for a different interaction (another
                user's, or other content); nothing of the call was written. Concurrent
                calls (committed together) are not affected.
            CommitOutcomeUnknownError: the commit was sent but not confirmed; the batch may
                or may not be stored (retrying it is safe).
            StoreUnavailableError: the database failed; nothing of the batch was written.
        """

    @abc.abstractmethod
    async def neighbourhood(
        self, user_id: str, hops: int = 2, fan_out: Sequence[int] = (64, 8, 16, 8)
    ) -> Neighbourhood:
        """Sample the user's k-hop neighbourhood, newest first, with a fan-out cap per node.

        Graph distance from the user node (seed, "Graph Structure"):
            1. the user's turns (the newest ``fan_out[0]``, less the turns of an interaction
               the cap would cut in two: :func:`graphstore.neighbourhood.whole_interactions`);
            2. their query, LLM, response and previous-turn nodes;
            3. other users' turns of the same LLMs (the newest ``fan_out[2]`` per LLM);
            4. those turns' users, queries and responses.
        A turn always comes with its query, LLM, response and user (the arrays need them),
        so ``hops`` 1 and 2 give the same subgraph, and so do 3 and 4.

        Args:
            user_id: The seed user; an unknown user gives :meth:`Neighbourhood.empty`.
            hops: k, 1–4.
            fan_out: Caps per distance; ``fan_out[0]`` bounds the user's turns and
                ``fan_out[2]`` the other turns taken per LLM. Other entries are unused (a
                turn has exactly one query, LLM, response, user and previous turn).

        Returns:
            The subgraph as plain arrays; the seed user is ``user_ids[0]``.
        """

    @abc.abstractmethod
    async def user_version(self, user_id: str) -> int:
        """The user's graph version: the number of writes that touched the user (0 if unknown).

        Cheap (one indexed read); replicas compare it with their cached state.
        """

    @abc.abstractmethod
    async def list_models(self) -> list[str]:
        """Names of every LLM node, sorted."""

    @abc.abstractmethod
    async def pair_counts(self) -> list[PairCount]:
        """Pairwise win counts over all recorded comparisons (for the Bradley–Terry prior)."""

    @abc.abstractmethod
    async def query_pair_counts(self, query_key: str, limit: int) -> list[PairCount]:
        """Pairwise win counts over the ``limit`` most recent comparisons (by timestamp)
        recorded for queries with this :func:`~graphstore.interactions.query_key`, by any
        user (the per-query Bradley–Terry evidence, ``server/query_evidence.py``).

        One indexed read. Comparisons recorded without a key (``query_key`` "", e.g. before
        the key existed) never count; a deleted user's comparisons are gone with the user.

        Returns:
            One :class:`PairCount` per model pair (``model_a < model_b``), sorted by names;
            empty for the key "" or an unknown key.

        Raises:
            ValueError: ``limit`` < 1.
            StoreUnavailableError: the database failed.
        """

    @abc.abstractmethod
    async def user_comparisons(self, user_id: str, limit: int) -> list[UserComparison]:
        """The user's ``limit`` most recent pairwise comparisons (by timestamp), newest first,
        with their query keys (the per-user Bradley–Terry evidence, ``server/user_evidence.py``).

        One indexed read. An unknown user has none; a deleted user's are gone.

        Raises:
            ValueError: ``limit`` < 1.
            StoreUnavailableError: the database failed.
        """

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Number of nodes per type and of interactions.

        Returns:
            ``{"user", "llm", "query", "response", "turn", "interaction"}`` → count.
        """

    @abc.abstractmethod
    async def delete_user(self, user_id: str) -> int:
        """Erase the user and everything recorded for them, in one transaction.

        Removes the user node, every interaction of the user with its query, turn and
        response nodes (and so its idempotency key: the same key may be recorded again), and
        subtracts the user's comparisons from the pair counts (a pair left with no games is
        removed), so the Bradley–Terry prior forgets them. LLM nodes are shared and stay.
        Afterwards :meth:`user_version` is 0 and :meth:`neighbourhood` is empty for the user.
        Idempotent: an unknown user deletes nothing.

        Returns:
            The number of interactions deleted (0 for an unknown user).

        Raises:
            CommitOutcomeUnknownError: the commit was sent but not confirmed; the user may or
                may not be deleted (calling it again is safe).
            StoreUnavailableError: the database failed; nothing was deleted.
        """

    # -- online learning (graphstore/registry.py) ----------------------------------------------

    @abc.abstractmethod
    async def recent_comparisons(self, limit: int) -> list[RecordedComparison]:
        """The ``limit`` most recent pairwise comparisons (by timestamp), newest first.

        Raises:
            ValueError: ``limit`` < 1.
            StoreUnavailableError: the database failed.
        """

    @abc.abstractmethod
    async def publish_model(self, model: PublishedModel, blob: bytes) -> PublishedModel:
        """Store fine-tuned weights (``blob``: checkpoint bytes) as the newest publication.

        Assigns the next ``seq`` and deletes all but the newest
        :data:`graphstore.registry.KEEP_PUBLISHED` publications, in one transaction.
        Idempotent on ``model.version``: publishing a stored version again returns the stored
        metadata and writes nothing.

        Returns:
            The stored metadata (with its ``seq``).

        Raises:
            CommitOutcomeUnknownError: the commit was sent but not confirmed (publishing the
                same version again is safe).
            StoreUnavailableError: the database failed; nothing was written.
        """

    @abc.abstractmethod
    async def latest_model(self) -> PublishedModel | None:
        """Metadata of the newest publication (highest ``seq``), or None. One indexed read.

        Raises:
            StoreUnavailableError: the database failed.
        """

    @abc.abstractmethod
    async def load_model(self, version: str) -> bytes | None:
        """The checkpoint bytes of a publication, or None when it is not (or no longer) stored.

        Raises:
            StoreUnavailableError: the database failed.
        """

    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` for ``ttl_s`` seconds.

        Succeeds when the lease is free, expired, or already ``holder``'s; atomic, so of
        several concurrent callers at most one holds an unexpired lease.

        Returns:
            True when ``holder`` now holds the lease.

        Raises:
            ValueError: ``ttl_s`` <= 0.
            CommitOutcomeUnknownError: the commit was sent but not confirmed: the lease may
                or may not be ``holder``'s (a later call tells).
            StoreUnavailableError: the database failed.
        """
