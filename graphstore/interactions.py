"""Domain records of the interaction graph: what one ``RecordResponse`` stores.

An *interaction* is one recorded turn of a user's conversation: the query, the model that
answered, its response and the user's feedback. Feedback is either an absolute rating
(normalised to [0, 1]) or a pairwise comparison between two models' responses to the same
query (Bradley–Terry outcome 1 / 0, or 0.5 / 0.5 for a tie).

In the graph (seed: ``shared/seed/gmtrouter-selection.txt``, "Graph Structure") every outcome
becomes one *turn* node (the seed's virtual turn node; one per user, conversation, model and
turn step) joined to the user, the query, the LLM and a response node carrying the outcome.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from graphstore.errors import IdempotencyConflictError, InvalidInteractionError


def query_key(text: str) -> str:
    """The store's key of a query text: ``sha256:<64 hex digits>`` of its UTF-8 bytes after
    collapsing runs of whitespace (and trimming the ends); "" for a blank text.

    Two requests with the same question (up to whitespace) share the key, whatever the user;
    the key reveals nothing of the text (it is stored also when ``privacy.store_raw_text`` is
    false).
    """
    norm = " ".join(text.split())
    if not norm:
        return ""
    return "sha256:" + hashlib.sha256(norm.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    """A pairwise preference between two models' responses to the same query.

    Attributes:
        winner_model: The preferred model (or, when ``tie``, the first of the two).
        loser_model: The other model.
        tie: True when the user preferred neither.
    """

    winner_model: str
    loser_model: str
    tie: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One model's outcome in one interaction: a turn node of the graph.

    Attributes:
        model: LLM name.
        value: Outcome in [0, 1]: 1 won / best rating, 0 lost / worst rating, 0.5 tie.
    """

    model: str
    value: float


@dataclasses.dataclass(frozen=True, slots=True)
class Interaction:
    """One recorded interaction (one ``RecordResponse``).

    Attributes:
        interaction_id: Unique id (server-made unless the client linked a ``Select``).
        user_id: End-user id.
        session_id: Conversation id; turns of one session are chained.
        turn_index: 0-based turn position inside the session.
        query: Query text ("" when the deployment keeps no raw text).
        query_embedding: float32 array of shape ``[D]`` (D = embedding dimension).
        model: The model that produced ``response`` ("" for a comparison without text).
        response: Response text.
        timestamp_s: Unix time in seconds (float).
        idempotency_key: Client key; a second record with the same key is a duplicate.
        rating: Normalised rating in [0, 1], or None.
        comparison: Pairwise outcome, or None.
        query_key: :func:`query_key` of the raw query text ("" when unknown): the same
            question asked by different users has the same key (the per-query evidence of
            :meth:`~graphstore.store.GraphStore.query_pair_counts`).
    """

    interaction_id: str
    user_id: str
    session_id: str
    turn_index: int
    query: str
    query_embedding: npt.NDArray[np.float32]
    model: str
    response: str
    timestamp_s: float
    idempotency_key: str
    rating: float | None = None
    comparison: Comparison | None = None
    query_key: str = ""

    def outcomes(self) -> list[Outcome]:
        """The turn nodes this interaction adds to the graph.

        Returns:
            A comparison gives two outcomes (winner 1.0 and loser 0.0, or 0.5 each for a
            tie); a rating gives one outcome for ``model``; no feedback gives one outcome of
            0.5 (the response was served, nothing is known of its quality).
        """
        if self.comparison is not None:
            c = self.comparison
            if c.tie:
                return [Outcome(c.winner_model, 0.5), Outcome(c.loser_model, 0.5)]
            return [Outcome(c.winner_model, 1.0), Outcome(c.loser_model, 0.0)]
        if self.rating is not None:
            return [Outcome(self.model, float(self.rating))]
        return [Outcome(self.model, 0.5)]

    def models(self) -> list[str]:
        """Every model name this interaction mentions (deduplicated, in order)."""
        names = [o.model for o in self.outcomes()]
        if self.model and self.model not in names:
            names.append(self.model)
        return list(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedComparison:
    """A stored pairwise comparison, as online fine-tuning reads it back.

    Attributes:
        interaction_id: The interaction's id.
        user_id: End-user id.
        session_id: Conversation id.
        turn_index: Turn position inside the session.
        query_embedding: float32 ``[D]``.
        winner_model: The preferred model (the first of the two for a tie).
        loser_model: The other model.
        tie: True when neither was preferred.
        timestamp_s: Unix time in seconds.
    """

    interaction_id: str
    user_id: str
    session_id: str
    turn_index: int
    query_embedding: npt.NDArray[np.float32]
    winner_model: str
    loser_model: str
    tie: bool
    timestamp_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class UserComparison:
    """One of a user's stored comparisons, as the per-user evidence reads it back
    (:meth:`~graphstore.store.GraphStore.user_comparisons`, ``server/user_evidence.py``).

    Attributes:
        winner_model: The preferred model (the first of the two for a tie).
        loser_model: The other model.
        tie: True when neither was preferred.
        query_key: :func:`query_key` of the query ("" when it was recorded without one).
    """

    winner_model: str
    loser_model: str
    tie: bool
    query_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class RecordResult:
    """What the store did with one interaction.

    Attributes:
        interaction_id: The stored id (the earlier one for a duplicate).
        duplicate: True when the idempotency key was seen before and nothing was written.
    """

    interaction_id: str
    duplicate: bool


@dataclasses.dataclass(frozen=True, slots=True)
class PairCount:
    """Aggregated pairwise outcomes between two models, for Bradley–Terry fitting.

    Attributes:
        model_a: First model (lexicographically smaller name).
        model_b: Second model.
        wins_a: Times ``model_a`` won (ties add 0.5 to each side).
        wins_b: Times ``model_b`` won.
    """

    model_a: str
    model_b: str
    wins_a: float
    wins_b: float


def new_interaction_id() -> str:
    """A fresh random interaction id (UUID4 hex, 32 characters)."""
    return uuid.uuid4().hex


def normalise_rating(value: float, scale_min: float, scale_max: float) -> float:
    """Map a rating on ``[scale_min, scale_max]`` to [0, 1].

    Raises:
        ValueError: when the scale is empty or the value lies outside it.
    """
    if not scale_max > scale_min:
        raise ValueError(
            f"rating scale_max (got {scale_max}) must exceed scale_min (got {scale_min})"
        )
    if not scale_min <= value <= scale_max:
        raise ValueError(f"rating value (got {value}) must lie in [{scale_min}, {scale_max}]")
    return (value - scale_min) / (scale_max - scale_min)


def pair_deltas(comparisons: Iterable[tuple[str, str, bool]]) -> list[PairCount]:
    """Win counts that ``(winner_model, loser_model, tie)`` comparisons add, per model pair.

    ``model_a < model_b``; a win adds 1 to the winner's side, a tie 0.5 to each side; a
    comparison of a model with itself adds nothing.

    Returns:
        One :class:`PairCount` per pair, sorted by names.
    """
    acc: dict[tuple[str, str], list[float]] = {}
    for winner, loser, tie in comparisons:
        if winner == loser:
            continue
        a, b = sorted((winner, loser))
        cell = acc.setdefault((a, b), [0.0, 0.0])
        if tie:
            cell[0] += 0.5
            cell[1] += 0.5
        elif winner == a:
            cell[0] += 1.0
        else:
            cell[1] += 1.0
    return [PairCount(a, b, w[0], w[1]) for (a, b), w in sorted(acc.items())]


def pair_counts_from(interactions: Sequence[Interaction]) -> list[PairCount]:
    """Aggregate the comparisons among ``interactions`` into per-pair win counts."""
    return pair_deltas(
        (c.winner_model, c.loser_model, c.tie)
        for c in (it.comparison for it in interactions)
        if c is not None
    )


#: Prefix of :func:`content_fingerprint` values: the version of their canonical encoding. A
#: stored fingerprint with another prefix (written by a later version) is not compared.
FINGERPRINT_PREFIX = "v1:"

_HASHED_TEXT = re.compile(r"sha256:[0-9a-f]{64}")


def _text_digest(text: str) -> str:
    """``sha256:<hex>`` of a text, or the text itself when it is such a digest already (a
    deployment with ``privacy.store_raw_text`` false stores texts that way)."""
    if _HASHED_TEXT.fullmatch(text):
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def content_fingerprint(it: Interaction) -> str:
    """What a retry of ``it`` must repeat, as ``"v1:" + sha256 hex`` (stored with the row).

    A retried ``RecordResponse`` (same ``idempotency_key`` or ``interaction_id``) is a
    duplicate only when its fingerprint equals the stored one. It covers everything the
    client sends that is stored: ``user_id``, ``session_id``, ``turn_index``, ``model``, the
    response text, the normalised rating (its scale is not stored: 4 on 1–5 and 7 on 1–9 are
    both 0.75), the comparison (winner, loser, tie) and the query: its text when there is one,
    else the embedding's float32 bytes. Left out, because a faithful retry may change them:

    * ``timestamp_s`` — the server fills in its own clock when the request has none;
    * the embedding of a query that has a text — the server computes it from the text when
      the request has none, and another replica (other CPU, other encoder build) may round
      differently;
    * ``interaction_id`` and ``idempotency_key`` — they are what is looked up; a retry may
      carry a fresh server-made id, or the id with another key.

    Texts count by their SHA-256, so a text stored raw and the same text stored hashed
    (``privacy.store_raw_text`` false: ``sha256:<hex>``) give the same fingerprint.
    """
    if it.query:
        query = ["text", _text_digest(it.query)]
    else:
        emb = np.ascontiguousarray(it.query_embedding, dtype="<f4")
        query = ["embedding", hashlib.sha256(emb.tobytes()).hexdigest()]
    c = it.comparison
    fields = [
        it.user_id,
        it.session_id,
        int(it.turn_index),
        it.model,
        _text_digest(it.response),
        None if it.rating is None else float(it.rating),
        None if c is None else [c.winner_model, c.loser_model, bool(c.tie)],
        query,
    ]
    canonical = json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
    return FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def is_retry_of(
    stored_user_id: str, stored_fingerprint: str | None, it: Interaction, fp: str
) -> bool:
    """Whether ``it`` (with :func:`content_fingerprint` ``fp``) repeats a stored interaction
    found by its idempotency key or id: the same user and, where the stored row has a
    fingerprint of this version, the same content. Rows stored before fingerprints existed
    (``None``), or with a fingerprint of another version, are compared by user only."""
    if stored_user_id != it.user_id:
        return False
    if stored_fingerprint is None or not stored_fingerprint.startswith(FINGERPRINT_PREFIX):
        return True
    return stored_fingerprint == fp


def idempotency_conflict(
    field: str, value: str, position: int, size: int
) -> IdempotencyConflictError:
    """The error for ``value`` of ``field`` (``"idempotency_key"`` or ``"interaction_id"``),
    stored already for a different interaction; ``position`` is the interaction's index among
    the ``size`` of its ``record`` call. Nothing of the stored interaction is revealed."""
    shown = repr(value) if len(value) <= 100 else f"{value[:100]!r}… ({len(value)} characters)"
    fresh = (
        "a new idempotency_key"
        if field == "idempotency_key"
        else "a new interaction_id (or none: the server then makes one)"
    )
    where = f" (interaction {position + 1} of {size} in this call)" if size > 1 else ""
    return IdempotencyConflictError(
        field,
        f"{shown} was already used for a different interaction{where}: another user's, or "
        f"one with other content (session, turn, model, response, rating, comparison or "
        f"query). A retry must repeat the original request unchanged; a new interaction "
        f"needs {fresh}. Nothing of this request is stored",
    )


def check_interaction(it: Interaction, embedding_dim: int) -> None:
    """Reject an interaction no store may write.

    Raises:
        InvalidInteractionError: the query embedding is not float32 ``[embedding_dim]``, or a
            comparison names the same model twice.
    """
    emb = it.query_embedding
    if emb.dtype != np.float32 or emb.shape != (embedding_dim,):
        raise InvalidInteractionError(
            f"query_embedding must be float32 [{embedding_dim}] (got {emb.dtype} {list(emb.shape)})"
        )
    c = it.comparison
    if c is not None and c.winner_model == c.loser_model:
        raise InvalidInteractionError(
            f"a comparison needs two different models (got {c.winner_model!r} twice)"
        )
