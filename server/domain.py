"""Transport-neutral request and result types of the routing service.

The gRPC servicer converts protobuf messages to these (``server/converters.py``); tests and
the replay tool may call :class:`server.routing.RoutingService` with them directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from graphstore.interactions import Comparison


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A candidate model (``CandidateModel`` in the proto)."""

    model: str
    lora_name: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class SelectQuery:
    """A routing request (``SelectRequest``).

    Attributes:
        query_embedding: float32 ``[D]`` supplied by the caller, or None to embed ``query``.
    """

    user_id: str
    candidates: tuple[Candidate, ...]
    query: str = ""
    query_embedding: npt.NDArray[np.float32] | None = None
    session_id: str = ""
    conversation_history: tuple[str, ...] = ()
    request_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Selection:
    """A routing decision (``SelectResponse``)."""

    selected_model: str
    lora_name: str
    score: float
    confidence: float
    method: str
    all_scores: dict[str, float]
    reasoning: str
    interaction_id: str
    model_version: str


@dataclasses.dataclass(frozen=True, slots=True)
class RatingFeedback:
    """An absolute rating ``value`` on ``[scale_min, scale_max]``."""

    value: float
    scale_min: float
    scale_max: float


@dataclasses.dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One interaction to record (``RecordResponseRequest``).

    Attributes:
        query_embedding: float32 ``[D]``, or None to embed ``query``.
        timestamp_s: Unix seconds, or None for the server's clock.
    """

    user_id: str
    session_id: str = ""
    turn_index: int = 0
    query: str = ""
    query_embedding: npt.NDArray[np.float32] | None = None
    model: str = ""
    response: str = ""
    interaction_id: str = ""
    idempotency_key: str = ""
    timestamp_s: float | None = None
    rating: RatingFeedback | None = None
    comparison: Comparison | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """Result of recording (``RecordResponseResponse``)."""

    interaction_id: str
    duplicate: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Ranking:
    """A user's ranking of candidate models (``PreferenceUpdate``).

    Attributes:
        preferences: ``(model, score)`` best first.
        version: The user's graph version the ranking was computed from.
        updated_at_s: Unix seconds when it was computed.
        method: How it was scored (as ``Selection.method``).
        model_version: The weights that scored it.
    """

    user_id: str
    preferences: tuple[tuple[str, float], ...]
    version: int
    updated_at_s: float
    method: str
    model_version: str = ""

    @property
    def order(self) -> tuple[str, ...]:
        """Model names best first."""
        return tuple(m for m, _ in self.preferences)
