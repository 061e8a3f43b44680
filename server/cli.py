"""The ``gmtrouter`` command line (typer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from server.config import ConfigError, load_settings
from server.logs import configure_logging

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
        asyncio.run(run_server(settings))
    except Exception as exc:  # start-up failure: say what failed, exit non-zero
        typer.echo(f"gmtrouter serve failed: {exc}", err=True)
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
