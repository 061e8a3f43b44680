"""structlog set-up: JSON lines in production, readable console output on a terminal.

No log line carries users' texts: the access log writes method, user id, request id, latency
and status only; :func:`redact_texts` replaces any ``query``, ``response`` or
``conversation_history`` field a log call might pass with its length; and console tracebacks
are rendered without frame locals (which could hold request texts).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

#: Log-event keys whose values are users' texts; :func:`redact_texts` never lets them through.
TEXT_KEYS = frozenset({"query", "response", "conversation_history"})


def redact_texts(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace the value of every :data:`TEXT_KEYS` key by its size.

    Returns:
        The event, with e.g. ``query="<redacted: 42 chars>"`` (a list or tuple value gives
        ``"<redacted: N items>"``).
    """
    for key in TEXT_KEYS.intersection(event):
        value = event[key]
        if isinstance(value, list | tuple):
            size = f"{len(value)} items"
        else:
            size = f"{len(str(value))} chars"
        event[key] = f"<redacted: {size}>"
    return event


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog and the stdlib root logger at start-up (again on a second call).

    Records of libraries that log through the stdlib (``graphstore``'s stores,
    sentence-transformers, the Neo4j driver, grpc's asyncio layer) go through the same
    processors and renderer as structlog's own events, so that with ``fmt="json"`` every line
    on stderr is one JSON object (``"logger"`` names the stdlib logger).

    Args:
        fmt: "json", "console", or "auto" (console when stderr is a terminal).
        level: "debug", "info", "warning" or "error".
    """
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    lvl = getattr(logging, level.upper())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        redact_texts,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
        )
        if use_console
        else structlog.processors.JSONRenderer()
    )
    if not use_console:
        shared.append(structlog.processors.format_exc_info)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
