"""The ``gmtrouter`` command line (typer)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
import typer

from server.config import ConfigError, load_settings
from server.logs import configure_logging

if TYPE_CHECKING:
    from model.datasets import PreferenceRecord

app = typer.Typer(
    help="gmtrouter: personalized LLM routing over a heterogeneous interaction graph.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (defaults when omitted)."),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Store URI: a file path or sqlite:///PATH (embedded, default "
        "sqlite:///data/gmtrouter.db), or neo4j://HOST:7687, bolt://, neo4j+s://.",
    ),
]


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event-loop factory for ``server.event_loop`` (None: asyncio's default).

    uvloop (libuv) runs grpc.aio's and the Neo4j driver's callbacks with less CPU per call
    than asyncio's selector loop (docs/performance-log.md, session 10); where it is not
    installed, asyncio's own loop serves with a warning.
    """
    if kind != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        import structlog

        structlog.get_logger("gmtrouter").warning(
            "uvloop is not installed; serving on asyncio's own event loop",
            setting="server.event_loop",
        )
        return None
    return uvloop.new_event_loop


@app.command()
def serve(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="gRPC port.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address.")] = None,
) -> None:
    """Run the gRPC routing service until SIGTERM/SIGINT."""
    from server.app import serve as run_server

    try:
        settings = load_settings(config, store_uri=store, port=port)
        if host is not None:
            settings = settings.model_copy(
                update={"server": settings.server.model_copy(update={"host": host})}
            )
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.logging.format, settings.logging.level)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.server.event_loop)) as runner:
            runner.run(run_server(settings))
    except Exception as exc:  # start-up failure: say what failed, exit non-zero
        typer.echo(f"gmtrouter serve failed: {exc}", err=True)
        raise typer.Exit(1) from None


DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="mt_bench or llmfao.")]
DataPathOpt = Annotated[
    Path, typer.Option("--data-path", help="Data-set folder or file (see README, Data).")
]


@app.command()
def train(
    dataset: DatasetOpt,
    data_path: DataPathOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")],
    num_layers: Annotated[int, typer.Option(help="HGT layers (1-5).")] = 2,
    hidden_dim: Annotated[int, typer.Option(help="Hidden dimension.")] = 64,
    num_heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    steps: Annotated[int, typer.Option(help="Training steps (episodes).")] = 300,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 5e-4,
    dropout: Annotated[float, typer.Option(help="Dropout probability.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed (training is deterministic).")] = 136,
    reverse_edges: Annotated[
        bool, typer.Option(help="Reverse edges (off = official destination-only wiring).")
    ] = True,
    history_readout: Annotated[
        bool,
        typer.Option(help="Per-user history readout on LLM nodes (off = the paper's head)."),
    ] = True,
    ema_decay: Annotated[
        float,
        typer.Option(
            help="Cap of the decay of the weight average that is validated and kept (it ramps "
            "up as (1+n)/(10+n) over n steps; 0 = raw weights)."
        ),
    ] = 0.99,  # TrainConfig's default (model.training imports torch: not at CLI start-up)
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    holdout_fraction: Annotated[
        float, typer.Option(help="Leave this share of users out (a seeded user split).")
    ] = 0.0,
    split_seed: Annotated[int, typer.Option(help="Seed of the user split.")] = 0,
) -> None:
    """Train the GMTRouter network on a preference data set and write a checkpoint."""
    from model.cli_commands import train_command, train_config

    _fail_cleanly(
        lambda: train_command(
            dataset,
            data_path,
            out,
            config=train_config(
                num_layers=num_layers,
                hidden_dim=hidden_dim,
                num_heads=num_heads,
                steps=steps,
                lr=lr,
                dropout=dropout,
                reverse_edges=reverse_edges,
                history_readout=history_readout,
                ema_decay=ema_decay,
            ),
            seed=seed,
            threads=threads,
            holdout_fraction=holdout_fraction,
            split_seed=split_seed,
        )
    )


@app.command()
def evaluate(
    dataset: DatasetOpt,
    data_path: DataPathOpt,
    protocol: Annotated[
        str, typer.Option(help="heldout (honest: scored pairs never in the graph) or faithful.")
    ] = "heldout",
    seeds: Annotated[int, typer.Option(help="Number of seeds (0..N-1).")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    num_layers: Annotated[int, typer.Option(help="HGT layers (1-5).")] = 2,
    hidden_dim: Annotated[int, typer.Option(help="Hidden dimension.")] = 64,
    num_heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    steps: Annotated[int, typer.Option(help="Training steps per seed.")] = 300,
    reverse_edges: Annotated[bool, typer.Option(help="Reverse edges (ablation: off).")] = True,
    history_readout: Annotated[
        bool, typer.Option(help="Per-user history readout (ablation: off = the paper's head).")
    ] = True,
    ema_decay: Annotated[
        float,
        typer.Option(help="Cap of the decay of the weight average (as train; 0 = raw weights)."),
    ] = 0.99,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Train and score every method on the same splits; print a table and write JSON."""
    from model.cli_commands import evaluate_command, train_config

    _fail_cleanly(
        lambda: evaluate_command(
            dataset,
            data_path,
            protocol,
            seeds,
            json_out,
            config=train_config(
                num_layers=num_layers,
                hidden_dim=hidden_dim,
                num_heads=num_heads,
                steps=steps,
                reverse_edges=reverse_edges,
                history_readout=history_readout,
                ema_decay=ema_decay,
            ),
            threads=threads,
        )
    )


@app.command()
def replay(
    dataset: DatasetOpt,
    data_path: DataPathOpt,
    json_out: Annotated[Path, typer.Option("--json", help="Write the result JSON here.")],
    target: Annotated[
        str | None, typer.Option("--target", help="host:port of a running gmtrouter.")
    ] = None,
    embedded: Annotated[
        bool,
        typer.Option("--embedded", help="Start a server in-process on a free port."),
    ] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Learning-curve PNG.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the conversation order.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Replay only this many comparisons.")] = None,
    holdout_fraction: Annotated[
        float,
        typer.Option(
            help="Replay only this share of users (a seeded user split, as `train "
            "--holdout-fraction`); the other users' judgments are learned first, unscored. "
            "0 = replay everyone from an empty store."
        ),
    ] = 0.0,
    split_seed: Annotated[int, typer.Option(help="Seed of the user split.")] = 0,
) -> None:
    """Play a data set's judged comparisons through the real gRPC API; report online accuracy."""
    import tempfile

    from model.datasets import load_dataset
    from server import replay as rp

    if (target is None) == (not embedded):
        typer.echo("give exactly one of --target HOST:PORT or --embedded", err=True)
        raise typer.Exit(2)
    try:
        records = load_dataset(dataset, data_path)
    except (OSError, ValueError) as exc:
        typer.echo(f"cannot read {dataset} from {data_path}: {exc}", err=True)
        raise typer.Exit(2) from None
    kwargs: dict[str, Any] = {"dataset": dataset, "seed": seed, "limit": limit}
    if holdout_fraction > 0:
        from model.datasets.splits import holdout_users

        held = holdout_users((r.user_id for r in records), holdout_fraction, split_seed)
        kwargs["warm"] = [r for r in records if r.user_id not in held]
        kwargs["warm_embeddings"] = _embed_queries(kwargs["warm"])
        records = [r for r in records if r.user_id in held]
    kwargs["query_embeddings"] = _embed_queries(records)
    if embedded:
        with tempfile.TemporaryDirectory(prefix="gmtrouter-replay-") as tmp:
            try:
                settings = load_settings(
                    config, store_uri=store or f"sqlite:///{tmp}/replay.db", port=0
                )
            except ConfigError as exc:
                typer.echo(str(exc), err=True)
                raise typer.Exit(2) from None
            configure_logging("json", "warning")
            result = asyncio.run(rp.replay_embedded(records, settings, **kwargs))
    else:
        assert target is not None
        result = asyncio.run(rp.replay(records, target, **kwargs))
    rp.write_json(result, json_out)
    typer.echo(rp.format_replay_table(result))
    typer.echo(f"JSON: {json_out}")
    if plot is not None:
        rp.plot_replay(result, plot)
        typer.echo(f"plot: {plot}")


@app.command("import")
def import_(
    dataset: DatasetOpt,
    data_path: DataPathOpt,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    seed: Annotated[int, typer.Option(help="Conversation-order seed (as replay).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Interactions per write batch.")] = 500,
) -> None:
    """Bulk-load a data set into the store (idempotent: re-running adds nothing)."""
    from graphstore.factory import Neo4jCredentials, create_store
    from model.datasets import load_dataset
    from server.importer import import_records

    try:
        settings = load_settings(config, store_uri=store)
        records = load_dataset(dataset, data_path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except (OSError, ValueError) as exc:
        typer.echo(f"cannot read {dataset} from {data_path}: {exc}", err=True)
        raise typer.Exit(2) from None
    embeddings = _embed_queries(records)
    creds = settings.store.neo4j
    graph = create_store(
        settings.store.uri,
        embedding_dim=settings.embedding.dim,
        neo4j=Neo4jCredentials(creds.user, creds.password.get_secret_value(), creds.database),
    )

    async def run() -> dict[str, Any]:
        await graph.open()
        try:
            return await import_records(
                graph, dataset, records, embeddings, seed=seed, batch_size=batch_size
            )
        finally:
            await graph.close()

    try:
        result = asyncio.run(run())
    except Exception as exc:
        typer.echo(f"import failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"dataset": dataset, "store": settings.store.uri, **result}))


def _embed_queries(records: Sequence[PreferenceRecord]) -> npt.NDArray[np.float32]:
    """float32 ``[N, D]`` embeddings of the records' query texts (each distinct text once)."""
    from model.data import embed_texts
    from model.text_encoder import TextEncoder

    texts = list(dict.fromkeys(r.query_text for r in records))
    typer.echo(f"embedding {len(texts)} distinct queries of {len(records)} records …", err=True)
    unique = embed_texts(TextEncoder(), texts)
    row = {t: i for i, t in enumerate(texts)}
    return unique[[row[r.query_text] for r in records]]


def _fail_cleanly(fn: Callable[[], object]) -> None:
    """Run a command body; turn expected errors into a one-line message and exit code 1."""
    try:
        fn()
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="YAML file to validate.")]) -> None:
    """Validate a configuration file and print the effective settings."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(settings.model_dump_json(indent=2))


if __name__ == "__main__":  # pragma: no cover
    app()
