"""Bradley–Terry evidence functions (``model/bradley_terry.py``): per-query strengths and the
per-user deviation the service adds (``server/user_evidence.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.bradley_terry import (
    fit_bradley_terry,
    per_query_deviation,
    per_query_strengths,
    user_deviation,
)

THETA = {"a": -0.2, "b": 0.0, "c": 0.4}


def test_per_query_strengths_keep_the_global_ones_without_games() -> None:
    assert per_query_strengths([], THETA, ["new"]) == {**THETA, "new": 0.0}
    fit = per_query_strengths([("a", "c", 1.0)] * 5, THETA, ["a", "c"])
    assert fit["a"] > THETA["a"] and fit["c"] < THETA["c"]
    dev = per_query_deviation([("a", "c", 1.0)] * 5, THETA, ["a", "c"])
    assert dev == pytest.approx({m: fit[m] - THETA[m] for m in ("a", "c")})


def test_user_deviation_carries_verdicts_on_the_query_to_an_unseen_pair() -> None:
    verdicts = [("a", "b", 1.0), ("b", "c", 1.0)] * 2  # a > b > c on this query
    dev = user_deviation(verdicts, verdicts, THETA, THETA, ["a", "c"])
    assert THETA["a"] + dev["a"] > THETA["c"] + dev["c"]
    assert user_deviation([], [], THETA, THETA, ["a", "c"]) == {"a": 0.0, "c": 0.0}


def test_user_weight_adds_the_users_taste_from_other_queries() -> None:
    elsewhere = [("a", "c", 1.0)] * 6
    assert user_deviation(elsewhere, [], THETA, THETA, ["a", "c"]) == {"a": 0.0, "c": 0.0}
    dev = user_deviation(elsewhere, [], THETA, THETA, ["a", "c"], user_weight=0.5)
    fit = fit_bradley_terry(elsewhere, prior_strength=5.0, prior=THETA, models=["a", "c"])
    assert dev["a"] == pytest.approx(0.5 * (fit["a"] - THETA["a"]), abs=1e-4)
    assert dev["c"] == pytest.approx(0.5 * (fit["c"] - THETA["c"]), abs=1e-4)
    with pytest.raises(ValueError, match="user_weight"):
        user_deviation(elsewhere, [], THETA, THETA, ["a"], user_weight=-1.0)


@settings(max_examples=60, deadline=None)
@given(
    wins=st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from("abcd"), st.sampled_from([0.5, 1.0])),
        max_size=12,
    ),
    strength=st.floats(0.5, 50.0),
)
def test_more_prior_games_never_move_the_user_further(
    wins: list[tuple[str, str, float]], strength: float
) -> None:
    """Shrinkage: the deviation of every candidate is bounded, and more virtual games pull it
    towards 0."""
    weak = user_deviation(wins, wins, THETA, THETA, "abcd", query_prior_strength=strength)
    strong = user_deviation(wins, wins, THETA, THETA, "abcd", query_prior_strength=strength * 4)
    spread_weak = max(weak.values()) - min(weak.values())
    spread_strong = max(strong.values()) - min(strong.values())
    assert spread_strong <= spread_weak + 1e-6
    assert all(abs(v) < 10 for v in weak.values())


def test_a_model_the_user_compared_is_centred_on_its_strength_whether_candidate_or_not() -> None:
    """The same-query fit centres every model the user compared (on the query's strength, else
    the global one), so a candidate's deviation does not depend on the other candidates."""
    theta = {"a": -0.2, "b": 0.8, "c": 0.4}
    query_theta = {"a": 0.1, "c": 0.2}  # b: no games of the query, keeps its global strength
    verdicts = [("a", "b", 1.0), ("b", "c", 1.0)] * 2
    two = user_deviation(verdicts, verdicts, theta, query_theta, ["a", "c"])
    three = user_deviation(verdicts, verdicts, theta, query_theta, ["a", "b", "c"])
    assert two["a"] == pytest.approx(three["a"], abs=1e-6)
    assert two["c"] == pytest.approx(three["c"], abs=1e-6)
