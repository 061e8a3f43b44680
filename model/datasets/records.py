"""The canonical preference record every data-set reader produces.

One :class:`PreferenceRecord` is **one judged pairwise comparison**: a user (judge, crowd
worker, end user) saw the responses of ``model_a`` and ``model_b`` to the same query, at one
turn of one conversation, and preferred one of them or neither.

Fields and conventions:

- ``user_id``: who judged (MT-Bench: ``judge``; LLMFAO: ``worker``), prefixed by nothing.
- ``session_id``: the conversation. MT-Bench: ``"<judge>/<question_id>"`` (a 2-turn
  conversation; all votes of one judge on one question share it). LLMFAO (single turn):
  one session per vote. Evaluation splits keep all turns of a session on one side.
- ``turn_index``: 0-based turn inside the session (MT-Bench turn 1 → 0, turn 2 → 1; the 10
  votes with an unknown turn get 0 and ``extra["turn_unknown"] = "1"``).
- ``query_id`` / ``query_text``: the user message of that turn (MT-Bench turn 2: the second
  user message, id ``"<question_id>:2"``; LLMFAO: the prompt id and text).
- ``model_a`` / ``model_b``: the two LLM names (different).
- ``outcome``: ``"a"`` (model_a preferred), ``"b"`` or ``"tie"``.
- ``response_a`` / ``response_b``: response texts of that turn ("" when unknown).
- ``category``: optional query category (MT-Bench: writing, math, …; LLMFAO: prompt type).
- ``extra``: optional string metadata (source row, …).

In the graph a record becomes one query node and two turn nodes (one per model) with
outcomes 1/0 (or 0.5/0.5 for a tie), as in the official GMTRouter data format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

Outcome = Literal["a", "b", "tie"]
OUTCOMES: tuple[str, ...] = ("a", "b", "tie")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One judged pairwise comparison (see the module docstring for every field)."""

    user_id: str
    session_id: str
    turn_index: int
    query_id: str
    query_text: str
    model_a: str
    model_b: str
    outcome: Outcome
    response_a: str = ""
    response_b: str = ""
    category: str | None = None
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome (got {self.outcome!r}) must be one of {OUTCOMES}")
        if self.model_a == self.model_b:
            raise ValueError(f"model_a and model_b must differ (got {self.model_a!r} twice)")
        if self.turn_index < 0:
            raise ValueError(f"turn_index (got {self.turn_index}) must be >= 0")

    @property
    def outcome_value(self) -> float:
        """Outcome of ``model_a`` in [0, 1]: 1.0 won, 0.0 lost, 0.5 tie."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.outcome]


def dataset_stats(records: list[PreferenceRecord]) -> dict[str, int]:
    """Counts: ``votes``, ``users``, ``models``, ``queries``, ``sessions``, ``ties``."""
    return {
        "votes": len(records),
        "users": len({r.user_id for r in records}),
        "models": len({m for r in records for m in (r.model_a, r.model_b)}),
        "queries": len({r.query_id for r in records}),
        "sessions": len({(r.user_id, r.session_id) for r in records}),
        "ties": sum(r.outcome == "tie" for r in records),
    }
