"""``gmtrouter replay``: play real users' judged comparisons through the live gRPC API.

For each judged comparison, in a seeded random order of conversations (turns of one
conversation in order; the data files are sorted by question, so file order would confound
learning with a change of topic):

1. ``Select`` with the two compared models as candidates, the conversation's query (its
   embedding, computed once client-side as a Go router would) and the earlier turns;
2. the prediction is whichever model got the higher score;
3. ``RecordResponse`` with the human outcome (winner/loser or tie).

Online pairwise accuracy counts non-tied comparisons; a prediction whose two scores are equal
counts as half right (a coin flip). The Bradley–Terry baselines (``global_bt``,
``per_user_bt`` shrunk towards the global strengths, and ``per_query_bt``: the global
strengths plus the per-query deviation the service adds, ``server/query_evidence.py``, with
its default settings) are replayed on the same stream: they predict before and learn after
each comparison, exactly like the service.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc as pb_grpc
from graphstore.interactions import query_key
from model.bradley_terry import comparison_wins, fit_bradley_terry, per_query_deviation
from model.data import embed_texts
from model.datasets import PreferenceRecord
from model.metrics import history_trend
from model.text_encoder import TextEncoder
from server.config import QueryEvidenceSettings
from server.heap import freeze_long_lived, thaw

#: Buckets of "interactions the user had before this one" for the learning curve.
CURVE_EDGES: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100, 200)


def replay_order(records: Sequence[PreferenceRecord], seed: int) -> list[PreferenceRecord]:
    """Conversations in a seeded random order; the turns of each conversation in order.

    Args:
        records: Canonical records (any order).
        seed: Shuffle seed.

    Returns:
        The same records, reordered.
    """
    sessions: dict[tuple[str, str], list[tuple[int, PreferenceRecord]]] = defaultdict(list)
    for i, r in enumerate(records):
        sessions[(r.user_id, r.session_id)].append((i, r))
    keys = sorted(sessions)
    random.Random(seed).shuffle(keys)
    out: list[PreferenceRecord] = []
    for k in keys:
        out += [r for _, r in sorted(sessions[k], key=lambda t: (t[1].turn_index, t[0]))]
    return out


def record_key(dataset: str, r: PreferenceRecord) -> str:
    """Stable idempotency key of a record (the same in ``import`` and ``replay``)."""
    return (
        f"{dataset}:{r.user_id}:{r.session_id}:{r.turn_index}:{r.query_id}:{r.model_a}:{r.model_b}"
    )


def curve_bucket(n_before: int) -> int:
    """Index into :data:`CURVE_EDGES` of the curve bucket for ``n_before`` earlier
    interactions of the user."""
    b = 0
    for i, edge in enumerate(CURVE_EDGES):
        if n_before >= edge:
            b = i
    return b


def _bucket_label(i: int) -> str:
    lo = CURVE_EDGES[i]
    hi = CURVE_EDGES[i + 1] - 1 if i + 1 < len(CURVE_EDGES) else None
    if hi is None:
        return f"{lo}+"
    return str(lo) if hi == lo else f"{lo}-{hi}"


class BaselineScores(NamedTuple):
    """Score differences θ_a − θ_b of the Bradley–Terry baselines for one comparison."""

    global_bt: float
    per_user_bt: float
    per_query_bt: float


def outcome_wins(a: str, b: str, outcome: str) -> list[tuple[str, str, float]]:
    """One comparison of ``a`` and ``b`` as ``(winner, loser, weight)`` triples
    (``outcome`` ∈ {"a", "b", "tie"}; a tie is two triples of weight 0.5)."""
    if outcome == "b":
        return comparison_wins(b, a)
    return comparison_wins(a, b, tie=outcome != "a")


class OnlineBradleyTerry:
    """Global and per-user Bradley–Terry models updated after every comparison.

    Args:
        prior_strength: Virtual games per model for the global fit.
        user_prior_strength: Virtual games per model pulling a user's strengths towards the
            global ones (the shrinkage of ``per_user_bt``).
        query_prior_strength: Virtual games per model pulling a query's strengths towards the
            global ones (``per_query_bt``; the service's ``query_evidence.prior_strength``).
    """

    def __init__(
        self,
        prior_strength: float = 1.0,
        user_prior_strength: float = 5.0,
        query_prior_strength: float = QueryEvidenceSettings().prior_strength,
    ) -> None:
        self.prior_strength = prior_strength
        self.user_prior_strength = user_prior_strength
        self.query_prior_strength = query_prior_strength
        self.games: list[tuple[str, str, float]] = []
        self.user_games: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
        self.query_games: dict[str, list[tuple[str, str, float]]] = defaultdict(list)
        self.theta: dict[str, float] = {}

    def predict(self, user: str, a: str, b: str, query: str = "") -> BaselineScores:
        """Score differences θ_a − θ_b of the three baselines for ``user`` asking the query
        with key ``query`` (:func:`graphstore.interactions.query_key`; "" = none)."""
        g = self.theta
        d_global = g.get(a, 0.0) - g.get(b, 0.0)
        d_query = d_global
        query_games = self.query_games.get(query) if query else None
        if query_games:
            dev = per_query_deviation(
                query_games, g, (a, b), prior_strength=self.query_prior_strength
            )
            d_query = d_global + dev[a] - dev[b]
        games = self.user_games.get(user)
        if not games:
            return BaselineScores(d_global, d_global, d_query)
        u = fit_bradley_terry(
            games, prior_strength=self.user_prior_strength, prior=g, models=(a, b), max_iter=100
        )
        return BaselineScores(d_global, u.get(a, 0.0) - u.get(b, 0.0), d_query)

    def update(
        self, user: str, a: str, b: str, outcome: str, *, query: str = "", refit: bool = True
    ) -> None:
        """Learn from one comparison (``outcome`` ∈ {"a", "b", "tie"}).

        Args:
            query: The query's key ("" = none).
            refit: Refit the global strengths now (False when loading many at once).
        """
        wins = outcome_wins(a, b, outcome)
        self.games += wins
        self.user_games[user] += wins
        if query:
            self.query_games[query] += wins
        if refit:
            self.refit()

    def refit(self) -> None:
        """Refit the global strengths on every comparison so far."""
        self.theta = fit_bradley_terry(
            self.games, prior_strength=self.prior_strength, max_iter=100, tol=1e-6
        )


@dataclasses.dataclass
class ReplayTally:
    """One method's online accuracy, learning curve and Select latencies (ms) in a replay."""

    hits: float = 0.0
    n: int = 0
    curve_hits: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(CURVE_EDGES))
    curve_n: list[int] = dataclasses.field(default_factory=lambda: [0] * len(CURVE_EDGES))
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    #: Per counted comparison: its user, the user's earlier interactions, and the hit.
    pair_users: list[str] = dataclasses.field(default_factory=list)
    pair_history: list[int] = dataclasses.field(default_factory=list)
    pair_hits: list[float] = dataclasses.field(default_factory=list)

    def add(self, diff: float, outcome: str, history: int, user: str = "") -> None:
        """Count one comparison (``diff`` = score(a) − score(b); a tie is not counted, a zero
        difference counts half) of ``user``, who had ``history`` interactions before it, in
        the overall tally and in its curve bucket (:func:`curve_bucket`)."""
        if outcome == "tie":
            return
        hit = 0.5 if diff == 0 else float((diff > 0) == (outcome == "a"))
        bucket = curve_bucket(history)
        self.hits += hit
        self.n += 1
        self.curve_hits[bucket] += hit
        self.curve_n[bucket] += 1
        self.pair_users.append(user)
        self.pair_history.append(history)
        self.pair_hits.append(hit)

    def trend(self, baseline: ReplayTally | None = None) -> dict[str, Any]:
        """:func:`model.metrics.history_trend` of this method's hits, or with ``baseline``
        (the same comparisons, replayed alongside) of the difference of their hits: does the
        advantage over the baseline grow with history?

        Raises:
            ValueError: ``baseline`` counted other comparisons.
        """
        hits = np.array(self.pair_hits)
        if baseline is not None:
            if baseline.pair_users != self.pair_users or baseline.pair_history != self.pair_history:
                raise ValueError("baseline was not replayed on the same comparisons")
            hits = hits - np.array(baseline.pair_hits)
        return history_trend(self.pair_users, self.pair_history, hits)

    def summary(self) -> dict[str, Any]:
        """The JSON shape of one method (``select_*_ms`` are NaN without latencies)."""
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        return {
            "online_accuracy": self.hits / self.n if self.n else None,
            "n_pairs": self.n,
            "curve": [
                {
                    "history": _bucket_label(i),
                    "min_history": CURVE_EDGES[i],
                    "accuracy": self.curve_hits[i] / self.curve_n[i] if self.curve_n[i] else None,
                    "n_pairs": self.curve_n[i],
                }
                for i in range(len(CURVE_EDGES))
            ],
            "select_p50_ms": float(np.percentile(lat, 50)),
            "select_p99_ms": float(np.percentile(lat, 99)),
            "trend": self.trend(),
        }


def summarize(
    tallies: dict[str, ReplayTally], baselines: Sequence[str] = ("global_bt", "per_query_bt")
) -> dict[str, dict[str, Any]]:
    """Each method's :meth:`ReplayTally.summary`, plus ``trend_vs_<baseline>`` (the trend of
    its advantage over that baseline, :meth:`ReplayTally.trend`) for each of ``baselines``
    that was replayed, on every method other than the baseline itself and those listed
    before it (``global_bt`` gets none, ``per_query_bt`` the one against ``global_bt``)."""
    out = {name: t.summary() for name, t in tallies.items()}
    for i, base in enumerate(baselines):
        if base not in tallies:
            continue
        for name, t in tallies.items():
            if name not in baselines[: i + 1]:
                out[name][f"trend_vs_{base}"] = t.trend(tallies[base])
    return out


async def replay(
    records: Sequence[PreferenceRecord],
    target: str,
    *,
    dataset: str,
    seed: int = 0,
    limit: int | None = None,
    query_embeddings: npt.NDArray[np.float32] | None = None,
    progress: bool = True,
    deadline_s: float = 30.0,
    warm: Sequence[PreferenceRecord] = (),
    warm_embeddings: npt.NDArray[np.float32] | None = None,
    send_warm: bool = True,
) -> dict[str, Any]:
    """Replay ``records`` against the service at ``target`` (``host:port``).

    With ``warm`` records (other users' judgments, e.g. the users a checkpoint was trained
    on), the service and the baselines first learn from those, unscored: the replay then
    measures how the service treats *new* users of a service that has been running.

    Args:
        records: Canonical records; reordered by :func:`replay_order`.
        target: gRPC address.
        dataset: Name recorded in the result.
        seed: Order seed.
        limit: Replay only the first ``limit`` records of the order (None = all).
        query_embeddings: float32 ``[N, D]`` aligned with ``records`` (None: embed here).
        progress: Show a tqdm progress bar.
        deadline_s: Deadline of each RPC, seconds.
        warm: Records learned before the replay, not scored.
        warm_embeddings: float32 ``[len(warm), D]`` (None: embed here).
        send_warm: Record ``warm`` through ``RecordResponse`` (False when the caller already
            imported them into the service's store).

    Returns:
        ``{"dataset", "seed", "n_records", "server_methods", "wall_s", "methods": {NAME:
        {"online_accuracy", "n_pairs", "curve", "select_p50_ms", "select_p99_ms", "trend",
        "trend_vs_global_bt", "trend_vs_per_query_bt"}}}``: ``trend`` is
        :func:`model.metrics.history_trend` of the method's hits (accuracy change per
        doubling of the user's history, with a 95 % interval over users), ``trend_vs_B`` the
        same of its advantage over baseline ``B`` (see :func:`summarize`).

    Raises:
        grpc.aio.AioRpcError: an RPC failed (the replay stops; nothing is retried silently).
    """
    if query_embeddings is None:
        query_embeddings = embed_texts(TextEncoder(), [r.query_text for r in records])
    emb_of = {id(r): query_embeddings[i] for i, r in enumerate(records)}
    order = replay_order(records, seed)
    if limit is not None:
        order = order[:limit]
    tallies = {name: ReplayTally() for name in ("gmtrouter", *BaselineScores._fields)}
    bt = OnlineBradleyTerry()
    seen: dict[str, int] = defaultdict(int)
    history: dict[tuple[str, str], list[str]] = defaultdict(list)
    methods: dict[str, int] = defaultdict(int)
    versions: set[str] = set()
    for r in warm:
        bt.update(
            r.user_id, r.model_a, r.model_b, r.outcome, query=query_key(r.query_text), refit=False
        )
    bt.refit()
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        if warm and send_warm:
            if warm_embeddings is None:
                warm_embeddings = embed_texts(TextEncoder(), [r.query_text for r in warm])
            for r, e in zip(
                tqdm(warm, desc="warm start", disable=not progress), warm_embeddings, strict=True
            ):
                await stub.RecordResponse(
                    _record_request(dataset, r, [float(x) for x in e], ""), timeout=deadline_s
                )
        # the records, the warm-started state (and, embedded, the server) live until the end:
        # keep them out of the collector's full passes, which would stall Selects
        freeze_long_lived()
        try:
            for i, r in enumerate(tqdm(order, desc=f"replay {dataset}", disable=not progress)):
                emb = [float(x) for x in emb_of[id(r)]]
                key = (r.user_id, r.session_id)
                t0 = time.perf_counter()
                sel = await stub.Select(
                    pb.SelectRequest(
                        user_id=r.user_id,
                        session_id=r.session_id,
                        query=r.query_text,
                        query_embedding=emb,
                        conversation_history=history[key],
                        candidate_models=[
                            pb.CandidateModel(model=r.model_a),
                            pb.CandidateModel(model=r.model_b),
                        ],
                        request_id=f"replay-{i}",
                    ),
                    timeout=deadline_s,
                )
                tallies["gmtrouter"].latencies_ms.append((time.perf_counter() - t0) * 1e3)
                methods[sel.method] += 1
                versions.add(sel.model_version)
                before = seen[r.user_id]
                served = sel.all_scores[r.model_a] - sel.all_scores[r.model_b]
                tallies["gmtrouter"].add(served, r.outcome, before, r.user_id)
                t1 = time.perf_counter()
                qkey = query_key(r.query_text)
                baselines = bt.predict(r.user_id, r.model_a, r.model_b, qkey)
                spent = (time.perf_counter() - t1) * 1e3
                for name, diff in baselines._asdict().items():
                    tallies[name].latencies_ms.append(spent)
                    tallies[name].add(diff, r.outcome, before, r.user_id)
                await stub.RecordResponse(
                    _record_request(dataset, r, emb, sel.interaction_id), timeout=deadline_s
                )
                bt.update(r.user_id, r.model_a, r.model_b, r.outcome, query=qkey)
                seen[r.user_id] += 1
                history[key].append(r.query_text)
        finally:
            thaw()  # what the replay froze may be collected once it is over
    return {
        "dataset": dataset,
        "seed": seed,
        "n_records": len(order),
        "n_warm_records": len(warm),
        "server_methods": dict(methods),
        "server_model_versions": sorted(versions)[:5],
        "wall_s": round(time.perf_counter() - start, 1),
        "methods": summarize(tallies),
    }


def _record_request(
    dataset: str, r: PreferenceRecord, emb: list[float], interaction_id: str
) -> pb.RecordResponseRequest:
    """The ``RecordResponse`` carrying a record's human outcome."""
    winner, loser = (r.model_b, r.model_a) if r.outcome == "b" else (r.model_a, r.model_b)
    return pb.RecordResponseRequest(
        interaction_id=interaction_id,
        user_id=r.user_id,
        session_id=r.session_id,
        turn_index=r.turn_index,
        query=r.query_text,
        query_embedding=emb,
        model=winner,
        response=r.response_a if winner == r.model_a else r.response_b,
        idempotency_key=record_key(dataset, r),
        comparison=pb.Comparison(winner_model=winner, loser_model=loser, tie=r.outcome == "tie"),
    )


def format_replay_table(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`replay` result."""
    lines = [
        f"replay {result['dataset']}: {result['n_records']} comparisons "
        f"(after {result['n_warm_records']} warm-start ones), seed {result['seed']}, "
        f"{result['wall_s']} s; server methods {result['server_methods']}",
        f"{'method':<14}{'online acc':>11}{'pairs':>8}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for name, m in result["methods"].items():
        acc = m["online_accuracy"]
        lines.append(
            f"{name:<14}{(f'{acc:.4f}' if acc is not None else '-'):>11}{m['n_pairs']:>8}"
            f"{m['select_p50_ms']:>9.2f}{m['select_p99_ms']:>9.2f}"
        )
    lines.append("learning curve (online accuracy by interactions the user had before):")
    names = list(result["methods"])
    lines.append(f"{'history':<10}{'pairs':>7}" + "".join(f"{n:>14}" for n in names))
    first = result["methods"][names[0]]["curve"]
    for i, point in enumerate(first):
        cells = []
        for n in names:
            acc = result["methods"][n]["curve"][i]["accuracy"]
            cells.append(f"{acc:>14.4f}" if acc is not None else f"{'-':>14}")
        lines.append(f"{point['history']:<10}{point['n_pairs']:>7}" + "".join(cells))
    lines.append(
        "trend (accuracy change per doubling of the user's history, 95 % interval over users;"
        " 'vs B': of the advantage over baseline B):"
    )
    for name, m in result["methods"].items():
        parts = [f"{name:<14}{_format_trend(m.get('trend'))}"]
        for key, value in m.items():
            if key.startswith("trend_vs_"):
                parts.append(f"vs {key.removeprefix('trend_vs_')} {_format_trend(value)}")
        lines.append("   ".join(parts))
    return "\n".join(lines)


def _format_trend(trend: dict[str, Any] | None) -> str:
    if not trend or trend.get("slope_per_doubling") is None:
        return "-"
    text = f"{trend['slope_per_doubling']:+.4f}"
    ci = trend.get("ci95")
    return f"{text} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else text


def plot_replay(result: dict[str, Any], path: str | Path) -> None:
    """Draw the learning curves (online accuracy vs. earlier interactions) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, m in result["methods"].items():
        pts = [(i, p["accuracy"]) for i, p in enumerate(m["curve"]) if p["accuracy"] is not None]
        if pts:
            trend = m.get("trend") or {}
            label = name
            if trend.get("slope_per_doubling") is not None:
                label += f" ({trend['slope_per_doubling']:+.3f} per doubling)"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    labels = [p["history"] for p in next(iter(result["methods"].values()))["curve"]]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("interactions the user had before")
    ax.set_ylabel("online pairwise accuracy (non-tied)")
    ax.set_title(f"gmtrouter replay: {result['dataset']} ({result['n_records']} comparisons)")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write ``result`` as indented JSON (creating the folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


async def replay_embedded(
    records: Sequence[PreferenceRecord],
    settings: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    """Start a real server in-process on a free port (settings' store), then :func:`replay`.

    The in-process server opens no Prometheus endpoint (``metrics_port`` 0): the replay
    measures latency from the client side, and a second replay or a running server would
    otherwise collide on the metrics port.

    Args:
        records: Canonical records.
        settings: :class:`server.config.Settings` for the in-process server.
        kwargs: Passed to :func:`replay`.
    """
    from server.app import RouterServer

    settings = settings.model_copy(
        update={
            "server": settings.server.model_copy(
                update={"host": "127.0.0.1", "port": 0, "metrics_port": 0}
            )
        }
    )
    from server.importer import import_records

    app = RouterServer(settings)
    port = await app.start(warm_up=False)
    try:
        warm = kwargs.get("warm", ())
        if warm:
            emb = kwargs.get("warm_embeddings")
            if emb is None:
                emb = embed_texts(TextEncoder(), [r.query_text for r in warm])
            await import_records(
                app.store,
                kwargs["dataset"],
                warm,
                emb,
                seed=kwargs.get("seed", 0),
                progress=kwargs.get("progress", True),
            )
        return await replay(records, f"127.0.0.1:{port}", send_warm=False, **kwargs)
    finally:
        await app.stop(grace_s=5)
