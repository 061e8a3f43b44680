"""The transport-neutral routing service: validation, embedding, scoring, recording, streams.

The gRPC servicer (``server/servicer.py``) only converts messages and delegates here; tests
and tools may call this class directly. Torch work (query embedding, the network's HGT encode)
runs on a thread pool, never on the event loop; the prediction head is a NumPy pass on the loop
(``server/personalization.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import math
import re
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from graphstore.errors import CommitOutcomeUnknownError, StoreUnavailableError
from graphstore.interactions import (
    Interaction,
    new_interaction_id,
    normalise_rating,
    query_key,
)
from graphstore.store import GraphStore
from model.text_encoder import TextEncoder
from server.config import Settings
from server.domain import (
    Candidate,
    FeedbackRecord,
    Ranking,
    Recorded,
    Selection,
    SelectQuery,
)
from server.errors import InvalidRequestError
from server.query_evidence import QueryEvidence, QueryEvidenceSource
from server.scoring import Scorer, Scores
from server.user_evidence import UserEvidence, UserEvidenceSource

log = structlog.get_logger(__name__)

#: Start of the UNAVAILABLE message of a RecordResponse refused before the commit.
RECORD_NOT_WRITTEN = "not written"
#: Start of the UNAVAILABLE message of a RecordResponse whose commit outcome is unknown.
RECORD_OUTCOME_UNKNOWN = "outcome unknown"

# ASCII control characters (C0 and DEL), refused in user ids and interaction ids. A compiled
# search instead of a generator over the characters (timeit, a 43-character id: 4.5 -> 0.6 µs).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

#: How far ahead of the server's clock a RecordResponse ``timestamp`` may lie, in seconds
#: (clock skew; history is read newest first, so a future-dated record would stay "newest").
MAX_TIMESTAMP_AHEAD_S = 24 * 3600.0


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done callback: mark a future's exception retrieved (nobody awaits it any more)."""
    if not future.cancelled():
        future.exception()


class RoutingService:
    """Selects a model per request and records feedback into the interaction graph.

    Args:
        settings: The validated configuration.
        store: An opened graph store.
        scorer: The scorer (network or Bradley–Terry prior).
        encoder: Query text encoder (lazy; loaded on first text query or by :meth:`warm_up`).
        executor: Thread pool for torch work.
        evidence: Per-query evidence added to the scores (``server/query_evidence.py``);
            None = none.
        user_evidence: Per-user evidence added to the scores (``server/user_evidence.py``);
            None = none.
    """

    def __init__(
        self,
        settings: Settings,
        store: GraphStore,
        scorer: Scorer,
        encoder: TextEncoder,
        executor: concurrent.futures.Executor,
        evidence: QueryEvidenceSource | None = None,
        user_evidence: UserEvidenceSource | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.scorer = scorer
        self.evidence = evidence
        self.user_evidence = user_evidence
        self.encoder = encoder
        self.executor = executor
        self._subscribers: dict[str, set[asyncio.Event]] = {}
        self._weights_generation = 0  # bumped by notify_all() on every weights swap

    # -- validation --------------------------------------------------------------------------

    def _check_user(self, user_id: str, field: str = "user_id") -> None:
        if not user_id or not user_id.strip():
            raise InvalidRequestError(field, "must not be empty")
        self._check_id(user_id, field, self.settings.limits.max_user_id_chars)

    def _check_id(self, value: str, field: str, limit: int | None = None) -> None:
        """An optional identifier or model name: at most ``limit`` characters (default
        ``limits.max_id_chars``; Neo4j indexes these: an index key holds at most ≈ 8 KB), no
        control characters."""
        limit = self.settings.limits.max_id_chars if limit is None else limit
        if len(value) > limit:
            raise InvalidRequestError(field, f"is {len(value)} characters; the limit is {limit}")
        if _CONTROL_CHARACTER.search(value):
            raise InvalidRequestError(field, "must not contain control characters")

    def _check_candidates(self, candidates: Sequence[Candidate], field: str) -> None:
        if not candidates:
            raise InvalidRequestError(field, "at least one candidate model is required")
        limit = self.settings.limits.max_candidates
        if len(candidates) > limit:
            raise InvalidRequestError(field, f"has {len(candidates)} entries; the limit is {limit}")
        for i, c in enumerate(candidates):
            if not c.model or not c.model.strip():
                raise InvalidRequestError(f"{field}[{i}].model", "model name must not be blank")
            self._check_id(c.model, f"{field}[{i}].model")

    def _check_query(
        self, query: str, embedding: npt.NDArray[np.float32] | None, *, stored: bool
    ) -> None:
        """A query text the server embeds is at most ``limits.max_query_chars``; with a
        client-supplied embedding the text is only hashed (Select) or stored (``stored``:
        RecordResponse, then at most ``limits.max_response_chars``, as a response)."""
        dim = self.settings.embedding.dim
        supplied = embedding is not None and embedding.size > 0
        limits = self.settings.limits
        limit = limits.max_query_chars if not supplied else limits.max_response_chars
        if (stored or not supplied) and len(query) > limit:
            raise InvalidRequestError("query", f"is {len(query)} characters; the limit is {limit}")
        if embedding is not None and embedding.size:
            if embedding.shape != (dim,):
                raise InvalidRequestError(
                    "query_embedding", f"has {embedding.size} values; this server expects {dim}"
                )
            if not np.all(np.isfinite(embedding)):
                raise InvalidRequestError("query_embedding", "must hold finite numbers only")
            return
        if not query or not query.strip():
            raise InvalidRequestError(
                "query", "either a non-empty query text or a query_embedding is required"
            )

    # -- embedding ---------------------------------------------------------------------------

    async def _embed(
        self, query: str, embedding: npt.NDArray[np.float32] | None
    ) -> npt.NDArray[np.float32]:
        if embedding is not None and embedding.size:
            return embedding.astype(np.float32, copy=False)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.executor, self.encoder.encode, [query])
        return np.ascontiguousarray(out[0], dtype=np.float32)

    # -- Select ------------------------------------------------------------------------------

    async def _score(
        self,
        user_id: str,
        emb: npt.NDArray[np.float32],
        names: list[str],
        evidence: asyncio.Future[QueryEvidence | None] | None,
        user_evidence: asyncio.Future[UserEvidence | None] | None,
    ) -> Scores:
        """The scorer's scores plus the per-query and the per-user evidence (``evidence``,
        ``user_evidence``: their reads, started before the query was embedded, so that they
        overlap the encode and the scorer).

        The per-user evidence counts once the user's comparisons read (two turns each) reach
        ``sampler.min_history`` turns (or fill ``user_evidence.max_comparisons``); the network's
        personalization counts all the user's turns, comparisons or not.
        """
        scored = await self.scorer.score(user_id, emb, names)
        # shielded: a cancelled Select leaves the reads to finish (see select())
        ev = await asyncio.shield(evidence) if evidence is not None else None
        uev = await asyncio.shield(user_evidence) if user_evidence is not None else None
        scores, reasoning = dict(scored.scores), scored.reasoning
        if ev is not None:
            scores = {m: v + ev.deviation[m] for m, v in scores.items()}
            reasoning = f"{reasoning}; {ev.describe()}"
        if uev is not None:
            min_turns = max(self.settings.sampler.min_history, 1)
            enough = (
                2 * uev.comparisons >= min_turns
                # a full read: the user has at least this many comparisons, maybe more
                or uev.comparisons >= self.settings.user_evidence.max_comparisons
            )
            if uev.error or not uev.comparisons or enough:
                scores = {m: v + uev.deviation[m] for m, v in scores.items()}
                reasoning = f"{reasoning}; {uev.describe()}"
            else:
                reasoning = (
                    f"{reasoning}; per-user evidence waits for {min_turns} turns "
                    f"(the user's comparisons give {2 * uev.comparisons})"
                )
        if ev is None and uev is None:
            return scored
        return dataclasses.replace(scored, scores=scores, reasoning=reasoning)

    async def select(self, req: SelectQuery) -> Selection:
        """Score every candidate for this user and query; return the best.

        Raises:
            InvalidRequestError: empty ``user_id``, no candidates, a blank model name or one
                longer than ``limits.max_id_chars``, too many candidates, a query to embed
                longer than ``limits.max_query_chars`` (with a client-supplied embedding the
                text is only hashed, at any length), or neither query text nor an embedding
                of dimension ``D``.
            StoreUnavailableError: the store failed.
        """
        self._check_user(req.user_id)
        self._check_candidates(req.candidates, "candidate_models")
        self._check_query(req.query, req.query_embedding, stored=False)
        names = list(dict.fromkeys(c.model for c in req.candidates))
        key = query_key(req.query)
        evidence = (
            asyncio.ensure_future(self.evidence.evidence(key, names))
            if self.evidence is not None and key
            else None
        )
        user_evidence = (
            asyncio.ensure_future(self.user_evidence.evidence(req.user_id, key, names, evidence))
            if self.user_evidence is not None
            else None
        )
        try:
            emb = await self._embed(req.query, req.query_embedding)
            scored = await self._score(req.user_id, emb, names, evidence, user_evidence)
        finally:
            # When the Select failed (or was cancelled) before it needed the evidence, the
            # reads are left to finish, not cancelled: a cancelled budgeted read counts as
            # abandoned and would make Selects answer degraded until it ends.
            for task in (evidence, user_evidence):
                if task is not None:
                    task.add_done_callback(_retrieve)
        best = max(names, key=lambda m: (scored.scores[m], -names.index(m)))
        ordered = sorted(scored.scores.values(), reverse=True)
        margin = ordered[0] - ordered[1] if len(ordered) > 1 else math.inf
        confidence = 1.0 if margin == math.inf else 1.0 / (1.0 + math.exp(-margin))
        lora = next(c.lora_name for c in req.candidates if c.model == best)
        runner = (
            f"; runner-up {max((m for m in names if m != best), key=lambda m: scored.scores[m])}"
            f" by {margin:.3f}"
            if len(names) > 1
            else ""
        )
        reasoning = f"{best} has the highest score {scored.scores[best]:.3f}{runner}. " + (
            scored.reasoning
        )
        return Selection(
            selected_model=best,
            lora_name=lora,
            score=scored.scores[best],
            confidence=confidence,
            method=scored.method,
            all_scores=dict(scored.scores),
            reasoning=reasoning,
            interaction_id=new_interaction_id(),
            model_version=scored.model_version,
        )

    # -- RecordResponse ----------------------------------------------------------------------

    async def record(self, rec: FeedbackRecord) -> Recorded:
        """Durably record one interaction; acknowledged only after the store committed it.

        With ``privacy.store_raw_text`` false the query embedding is computed from the text
        first, then the store gets ``sha256:<64 hex digits>`` (of the UTF-8 text) in place of
        the query and the response text ("" stays ""); no raw text reaches the store.

        Raises:
            InvalidRequestError: empty ``user_id``; no ``model`` without a comparison; a
                comparison without winner/loser or with winner == loser; a rating outside its
                scale or not finite; neither query text nor embedding; a query longer than
                ``limits.max_query_chars`` (``limits.max_response_chars`` with a
                client-supplied embedding) or a response longer than
                ``limits.max_response_chars``; an ``interaction_id`` with ':'; an
                ``interaction_id``, ``session_id``, ``idempotency_key`` or model name longer
                than ``limits.max_id_chars`` or with control characters; a ``timestamp``
                before 1970 or more than :data:`MAX_TIMESTAMP_AHEAD_S` ahead of the clock.
            graphstore.errors.IdempotencyConflictError: the ``idempotency_key`` or
                ``interaction_id`` is stored already for a different interaction (another
                user's, or other content: only a retry of the same request is a duplicate);
                nothing was written (gRPC ``INVALID_ARGUMENT``).
            CommitOutcomeUnknownError: the store connection dropped while the commit was in
                flight, or an attempt had sent its commit before the write failed; the
                message starts with :data:`RECORD_OUTCOME_UNKNOWN`. Retrying
                with the same idempotency key stores it exactly once.
            StoreUnavailableError: the store failed before committing; nothing was written
                (the message starts with :data:`RECORD_NOT_WRITTEN`).
        """
        self._check_user(rec.user_id)
        self._check_query(rec.query, rec.query_embedding, stored=True)
        if rec.turn_index < 0:
            raise InvalidRequestError("turn_index", "must be >= 0")
        self._check_id(rec.interaction_id, "interaction_id")
        # turn ids are "<interaction id>:<model>": a ':' here could make two equal
        if ":" in rec.interaction_id:
            raise InvalidRequestError("interaction_id", "must not contain ':'")
        self._check_id(rec.session_id, "session_id")
        self._check_id(rec.idempotency_key, "idempotency_key")
        self._check_id(rec.model, "model")
        limit = self.settings.limits.max_response_chars
        if len(rec.response) > limit:
            raise InvalidRequestError(
                "response", f"is {len(rec.response)} characters; the limit is {limit}"
            )
        if rec.timestamp_s is not None:
            now = time.time()
            if rec.timestamp_s < 0:
                raise InvalidRequestError(
                    "timestamp", f"is {rec.timestamp_s:.0f} s, before 1970-01-01 (the Unix epoch)"
                )
            if rec.timestamp_s > now + MAX_TIMESTAMP_AHEAD_S:
                raise InvalidRequestError(
                    "timestamp",
                    f"lies {(rec.timestamp_s - now) / 3600:.1f} hours ahead of the server's "
                    f"clock; the limit is {MAX_TIMESTAMP_AHEAD_S / 3600:.0f} hours (omit it "
                    f"and the server stamps the time it records)",
                )
        rating: float | None = None
        c = rec.comparison
        if c is not None:
            if not c.winner_model.strip():
                raise InvalidRequestError("comparison.winner_model", "must not be blank")
            if not c.loser_model.strip():
                raise InvalidRequestError("comparison.loser_model", "must not be blank")
            self._check_id(c.winner_model, "comparison.winner_model")
            self._check_id(c.loser_model, "comparison.loser_model")
            if c.winner_model == c.loser_model:
                raise InvalidRequestError(
                    "comparison", f"winner_model and loser_model are both {c.winner_model!r}"
                )
        elif not rec.model.strip():
            raise InvalidRequestError(
                "model", "must not be blank (unless feedback is a comparison)"
            )
        if rec.rating is not None:
            r = rec.rating
            if not all(
                map(math.isfinite, (r.value, r.scale_min, r.scale_max, r.scale_max - r.scale_min))
            ):
                raise InvalidRequestError(
                    "rating", "value, scale_min, scale_max and their range must be finite numbers"
                )
            try:
                rating = normalise_rating(r.value, r.scale_min, r.scale_max)
            except ValueError as exc:
                raise InvalidRequestError("rating", str(exc)) from None
        emb = await self._embed(rec.query, rec.query_embedding)
        keep_text = self.settings.privacy.store_raw_text

        def stored(text: str) -> str:
            if keep_text or not text:
                return text
            return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

        interaction = Interaction(
            interaction_id=rec.interaction_id or new_interaction_id(),
            user_id=rec.user_id,
            session_id=rec.session_id,
            turn_index=rec.turn_index,
            query=stored(rec.query),
            query_key=query_key(rec.query),
            query_embedding=emb,
            model=rec.model,
            response=stored(rec.response),
            timestamp_s=rec.timestamp_s if rec.timestamp_s is not None else time.time(),
            idempotency_key=rec.idempotency_key,
            rating=rating,
            comparison=c,
        )
        try:
            (result,) = await self.store.record([interaction])
        except CommitOutcomeUnknownError as exc:
            raise CommitOutcomeUnknownError(
                f"{RECORD_OUTCOME_UNKNOWN}: {exc}. Retry with the same idempotency_key "
                f"(or interaction_id): a stored interaction is then reported as a duplicate"
            ) from exc
        except StoreUnavailableError as exc:
            raise StoreUnavailableError(
                f"{RECORD_NOT_WRITTEN}: {exc}. Nothing of this request is stored; retry later"
            ) from exc
        if not result.duplicate:
            self.scorer.invalidate(rec.user_id)
            if self.evidence is not None and c is not None:
                self.evidence.invalidate(interaction.query_key)
            if self.user_evidence is not None and c is not None:
                self.user_evidence.invalidate(rec.user_id)
            self._notify(rec.user_id)
        return Recorded(result.interaction_id, result.duplicate)

    # -- DeleteUser ----------------------------------------------------------------------------

    async def delete_user(self, user_id: str) -> int:
        """Erase the user from the store and from this process's caches.

        Removes the user's interactions, turns, responses, idempotency keys and pair-count
        contributions (:meth:`GraphStore.delete_user`), drops the scorer's cached state for
        the user, and wakes the user's open preference streams, which then send the reset
        ranking (version 0). Other replicas notice the version change within
        ``streaming.poll_interval_s`` (streams) or at their next cache check.

        Returns:
            The number of interactions deleted (0 for an unknown user).

        Raises:
            InvalidRequestError: empty or invalid ``user_id``.
            CommitOutcomeUnknownError: the connection dropped at the commit (Neo4j): the
                user may or may not be deleted; this replica's caches are dropped anyway.
                DeleteUser is idempotent: call it again.
            StoreUnavailableError: the store failed before committing; nothing was deleted.
        """
        self._check_user(user_id)
        try:
            deleted = await self.store.delete_user(user_id)
        except CommitOutcomeUnknownError:
            self._forget_user(user_id)
            raise
        self._forget_user(user_id)
        log.info("user deleted", user_id=user_id, deleted_interactions=deleted)
        return deleted

    def _forget_user(self, user_id: str) -> None:
        """Drop this replica's cached state of the user and wake its preference streams."""
        self.scorer.invalidate(user_id)
        if self.evidence is not None:
            self.evidence.clear()
        if self.user_evidence is not None:
            self.user_evidence.invalidate(user_id)
        self._notify(user_id)

    # -- StreamPreferences -------------------------------------------------------------------

    def _notify(self, user_id: str) -> None:
        for ev in self._subscribers.get(user_id, ()):
            ev.set()

    def notify_all(self) -> None:
        """The scoring weights were swapped: every open preference stream re-ranks its users
        and sends the new rankings."""
        self._weights_generation += 1
        for events in self._subscribers.values():
            for ev in events:
                ev.set()

    async def ranking(self, user_id: str, candidates: Sequence[str]) -> Ranking:
        """The user's current ranking of ``candidates`` (for the user's typical query)."""
        version = await self.store.user_version(user_id)
        scored = await self.scorer.score(user_id, None, candidates)
        prefs = tuple(
            sorted(scored.scores.items(), key=lambda kv: (-kv[1], list(candidates).index(kv[0])))
        )
        return Ranking(user_id, prefs, version, time.time(), scored.method, scored.model_version)

    async def stream_preferences(
        self, user_ids: Sequence[str], candidates: Sequence[Candidate]
    ) -> AsyncGenerator[Ranking, None]:
        """Yield each user's current ranking, then a new one whenever it changes.

        A change is noticed at once for writes made through this process and within
        ``streaming.poll_interval_s`` for writes made by other replicas (the store's per-user
        version is polled). A swap of the network weights (online learning,
        :meth:`notify_all`) re-ranks every subscribed user and sends the new rankings (with
        the new ``model_version``) at once. A ranking that came out degraded (store down or
        slow) is recomputed at every poll until it is not.
        The generator runs until the consumer stops iterating.

        Raises:
            InvalidRequestError: no user ids, more than ``limits.max_stream_users``, an
                invalid user id, or invalid candidates.
        """
        if not user_ids:
            raise InvalidRequestError("user_ids", "at least one user id is required")
        limit = self.settings.limits.max_stream_users
        if len(user_ids) > limit:
            raise InvalidRequestError(
                "user_ids",
                f"has {len(user_ids)} entries; the limit is {limit} per stream (open several "
                f"streams, or raise limits.max_stream_users)",
            )
        for i, u in enumerate(user_ids):
            self._check_user(u, f"user_ids[{i}]")
        self._check_candidates(candidates, "candidate_models")
        names = list(dict.fromkeys(c.model for c in candidates))
        users = list(dict.fromkeys(user_ids))
        event = asyncio.Event()
        for u in users:
            self._subscribers.setdefault(u, set()).add(event)
        try:
            last: dict[str, Ranking] = {}
            generation = self._weights_generation
            for u in users:
                last[u] = await self.ranking(u, names)
                yield last[u]
            poll = self.settings.streaming.poll_interval_s
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=poll)
                event.clear()
                swapped = self._weights_generation != generation
                generation = self._weights_generation
                for u in users:
                    version = await self.store.user_version(u)
                    degraded = last[u].method.startswith("degraded")
                    if version == last[u].version and not swapped and not degraded:
                        continue
                    if version != last[u].version:
                        self.scorer.invalidate(u)
                    current = await self.ranking(u, names)
                    # A lower version means the user was deleted (DeleteUser), a new weights
                    # generation that online learning swapped the weights: always tell.
                    changed = (
                        current.order != last[u].order
                        or current.version < last[u].version
                        or swapped
                        or current.method != last[u].method  # e.g. back from degraded
                    )
                    last[u] = current
                    if changed:
                        yield current
        finally:
            for u in users:
                subs = self._subscribers.get(u)
                if subs is not None:
                    subs.discard(event)
                    if not subs:
                        del self._subscribers[u]

    @property
    def subscriber_count(self) -> int:
        """Number of (user, stream) subscriptions currently open."""
        return sum(len(s) for s in self._subscribers.values())
