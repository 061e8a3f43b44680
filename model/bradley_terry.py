"""Bradley–Terry strengths from pairwise outcomes (Bradley & Terry 1952; Hunter 2004, MM).

P(i beats j) = sigmoid(θ_i − θ_j). Used as the non-personalized prior (``bt_prior``), the
``global_bt`` / ``per_user_bt`` baselines and for cold-start users.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def fit_bradley_terry(
    wins: Iterable[tuple[str, str, float]],
    *,
    prior_strength: float = 1.0,
    prior: Mapping[str, float] | None = None,
    models: Iterable[str] = (),
    max_iter: int = 200,
    tol: float = 1e-8,
) -> dict[str, float]:
    """Fit Bradley–Terry log-strengths θ with a Gaussian-like shrinkage by MM iterations.

    Each model gets ``prior_strength`` virtual games against a virtual opponent whose strength
    equals the model's prior (``prior[m]``, or 0), half won and half lost. That keeps θ finite
    for unbeaten or unbeaten-against models and shrinks sparse models towards their prior.

    Args:
        wins: ``(winner, loser, weight)`` triples; a tie is two triples of weight 0.5.
        prior_strength: Virtual games per model (≥ 0; 0 = maximum likelihood).
        prior: Optional prior log-strength per model (e.g. global strengths for a per-user fit).
        models: Extra model names to include even without games (they get their prior).
        max_iter: MM iterations at most.
        tol: Stop when the largest change of θ is below this.

    Returns:
        ``{model: θ}``; θ is centred to mean 0 when ``prior`` is None.

    Raises:
        ValueError: on a negative weight or prior_strength.
    """
    if prior_strength < 0:
        raise ValueError(f"prior_strength (got {prior_strength}) must be >= 0")
    names: dict[str, int] = {}
    rows: list[tuple[int, int, float]] = []
    for w, lose, weight in wins:
        if weight < 0:
            raise ValueError(f"weight (got {weight}) must be >= 0")
        if w == lose or weight == 0:
            continue
        rows.append((names.setdefault(w, len(names)), names.setdefault(lose, len(names)), weight))
    for m in models:
        names.setdefault(m, len(names))
    if prior is not None:
        for m in prior:
            names.setdefault(m, len(names))
    n = len(names)
    if n == 0:
        return {}
    base = np.zeros(n)
    if prior is not None:
        for m, i in names.items():
            base[i] = float(prior.get(m, 0.0))
    win_count = np.zeros(n)
    pair_games: dict[tuple[int, int], float] = {}
    for wi, li, weight in rows:
        win_count[wi] += weight
        key = (wi, li) if wi < li else (li, wi)
        pair_games[key] = pair_games.get(key, 0.0) + weight
    if prior_strength == 0 and not rows:
        return {m: float(base[i]) for m, i in names.items()}
    idx_i = np.array([k[0] for k in pair_games], dtype=np.int64)
    idx_j = np.array([k[1] for k in pair_games], dtype=np.int64)
    games = np.array(list(pair_games.values()), dtype=np.float64)
    p = np.exp(base)  # strengths, start at the prior
    virt = np.exp(base)
    for _ in range(max_iter):
        denom = np.zeros(n)
        if len(games):
            s = games / (p[idx_i] + p[idx_j])
            np.add.at(denom, idx_i, s)
            np.add.at(denom, idx_j, s)
        denom += prior_strength / (p + virt)
        numer = win_count + prior_strength / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            new_p = np.where(denom > 0, numer / denom, p)
        new_p = np.maximum(new_p, 1e-12)
        if prior is None:
            new_p = new_p / np.exp(np.mean(np.log(new_p)))
        delta = np.max(np.abs(np.log(new_p) - np.log(p)))
        p = new_p
        if delta < tol:
            break
    theta = np.log(p)
    return {m: float(theta[i]) for m, i in names.items()}


def comparison_wins(winner: str, loser: str, tie: bool = False) -> list[tuple[str, str, float]]:
    """One comparison as the ``(winner, loser, weight)`` triples :func:`fit_bradley_terry`
    takes: one of weight 1, or for a tie two of weight 0.5."""
    if tie:
        return [(winner, loser, 0.5), (loser, winner, 0.5)]
    return [(winner, loser, 1.0)]


def win_probability(theta_a: float, theta_b: float) -> float:
    """P(a beats b) = sigmoid(θ_a − θ_b), in [0, 1]."""
    return float(1.0 / (1.0 + np.exp(-(theta_a - theta_b))))


def per_query_deviation(
    wins: Iterable[tuple[str, str, float]],
    theta: Mapping[str, float],
    candidates: Iterable[str],
    *,
    prior_strength: float = 10.0,
) -> dict[str, float]:
    """How one query's outcomes move each candidate away from its global strength.

    Fits Bradley–Terry strengths on the query's own comparisons, each model pulled towards
    its global strength ``theta[m]`` (0 when absent) by ``prior_strength`` virtual games
    (:func:`fit_bradley_terry` with ``prior=theta``), and returns ``θ_q[m] − θ[m]``. Few
    comparisons give a deviation near 0; many give the query's own strength difference.
    Not in the GMTRouter paper: an addition of ours (``server/query_evidence.py``).

    Args:
        wins: The query's ``(winner, loser, weight)`` triples; a tie is two of weight 0.5.
        theta: Global log-strengths.
        candidates: Models to return.
        prior_strength: Virtual games per model (≥ 0).

    Returns:
        ``{candidate: deviation}`` in log-strength units (0.0 for every candidate when
        ``wins`` is empty).

    Raises:
        ValueError: negative ``prior_strength`` or weight.
    """
    names = list(dict.fromkeys(candidates))
    fit = per_query_strengths(wins, theta, names, prior_strength=prior_strength)
    return {m: fit.get(m, 0.0) - float(theta.get(m, 0.0)) for m in names}


def per_query_strengths(
    wins: Iterable[tuple[str, str, float]],
    theta: Mapping[str, float],
    models: Iterable[str] = (),
    *,
    prior_strength: float = 10.0,
) -> dict[str, float]:
    """One query's Bradley–Terry log-strengths θ_q, each model pulled towards its global
    strength ``theta[m]`` by ``prior_strength`` virtual games (:func:`per_query_deviation`
    returns ``θ_q − θ`` of the candidates).

    Args:
        wins: The query's ``(winner, loser, weight)`` triples; a tie is two of weight 0.5.
        theta: Global log-strengths.
        models: Models to include even when neither in ``wins`` nor in ``theta``.
        prior_strength: Virtual games per model (≥ 0).

    Returns:
        ``{model: θ_q}`` for every model of ``theta``, ``wins`` and ``models`` (a model
        without games of the query keeps its global strength; 0.0 when unknown).

    Raises:
        ValueError: negative ``prior_strength`` or weight.
    """
    rows = list(wins)
    if not rows:
        return {**{m: 0.0 for m in models}, **{m: float(v) for m, v in theta.items()}}
    return fit_bradley_terry(
        rows, prior_strength=prior_strength, prior=theta, models=models, max_iter=100
    )


def user_deviation(
    user_wins: Iterable[tuple[str, str, float]],
    user_query_wins: Iterable[tuple[str, str, float]],
    theta: Mapping[str, float],
    query_theta: Mapping[str, float],
    candidates: Iterable[str],
    *,
    user_prior_strength: float = 5.0,
    user_weight: float = 0.0,
    query_prior_strength: float = 3.0,
) -> dict[str, float]:
    """How one user's own earlier outcomes move each candidate's score.

    Two terms, each a Bradley–Terry fit pulled towards a centre by virtual games
    (:func:`fit_bradley_terry` with ``prior``):

    * the user's taste: strengths θ_u fitted on all the user's comparisons ``user_wins``,
      centred on the global strengths ``theta`` (``user_prior_strength`` virtual games per
      model), contributing ``user_weight × (θ_u[m] − θ[m])``;
    * the user's verdicts on this query: strengths θ_uq fitted on the user's comparisons of
      the same query ``user_query_wins``, centred on the query's strengths ``query_theta``
      (every user's outcomes on it, :func:`per_query_strengths`; ``query_prior_strength``
      virtual games), contributing ``θ_uq[m] − θ_q[m]``. The user's earlier verdicts on other
      pairs of this query's answers reach the candidates through the fit (a beat b, b beat c
      ⇒ a ahead of c). The user's verdicts on the query count in θ_q as well (it is fitted on
      every user's): the user-level fit moves the user away from the crowd only as far as
      their own verdicts differ from it.

    Not in the GMTRouter paper: an addition of ours (``server/user_evidence.py``), measured
    in README → Results.

    Args:
        user_wins: The user's ``(winner, loser, weight)`` triples (a tie: two of 0.5).
        user_query_wins: The subset of them on this query.
        theta: Global log-strengths.
        query_theta: The query's log-strengths (``theta`` when nobody compared it).
        candidates: Models to return.
        user_prior_strength, query_prior_strength: Virtual games per model (≥ 0).
        user_weight: Multiplier of the user's taste term (≥ 0; 0 leaves it out).

    Returns:
        ``{candidate: deviation}`` in log-strength units (all 0.0 without comparisons).

    Raises:
        ValueError: a negative prior strength or weight.
    """
    for name, value in (
        ("user_weight", user_weight),
        ("user_prior_strength", user_prior_strength),
        ("query_prior_strength", query_prior_strength),
    ):
        if value < 0:
            raise ValueError(f"{name} (got {value}) must be >= 0")
    names = list(dict.fromkeys(candidates))
    out = {m: 0.0 for m in names}
    overall = list(user_wins)
    if overall and user_weight > 0:
        fit = fit_bradley_terry(
            overall,
            prior_strength=user_prior_strength,
            prior=theta,
            models=names,
            max_iter=100,
            tol=1e-6,
        )
        for m in names:
            out[m] += user_weight * (fit[m] - float(theta.get(m, 0.0)))
    same_query = list(user_query_wins)
    if same_query:
        # every model the user compared is centred: on the query's strength, else the global
        centre = {m: float(v) for m, v in theta.items()}
        centre.update({m: float(v) for m, v in query_theta.items()})
        for m in names:
            centre.setdefault(m, 0.0)
        fit = fit_bradley_terry(
            same_query,
            prior_strength=query_prior_strength,
            prior=centre,
            models=names,
            max_iter=100,
            tol=1e-6,
        )
        for m in names:
            out[m] += fit[m] - centre[m]
    return out
