"""structlog set-up: JSON lines in production, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog (and the stdlib root logger) once at start-up.

    Args:
        fmt: "json", "console", or "auto" (console when stderr is a terminal).
        level: "debug", "info", "warning" or "error".
    """
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    lvl = getattr(logging, level.upper())
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    if not use_console:
        processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
