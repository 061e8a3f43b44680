"""Domain errors of the routing service and the one table that maps them to gRPC codes."""

from __future__ import annotations

import grpc

from graphstore.errors import (
    CommitOutcomeUnknownError,
    IdempotencyConflictError,
    InvalidInteractionError,
    StoreUnavailableError,
)


class RoutingError(Exception):
    """Base class of the routing service's errors."""


class InvalidRequestError(RoutingError, ValueError):
    """A request field is invalid; ``field`` names it (proto field name or path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(RoutingError, LookupError):
    """A referenced entity (e.g. an interaction id) does not exist."""


class NotReadyError(RoutingError):
    """The service is starting or shutting down."""


#: Domain exception → gRPC status code. The first matching class wins (most specific first).
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInteractionError, grpc.StatusCode.INVALID_ARGUMENT),
    # An idempotency_key or interaction_id stored for a different interaction (another
    # user's, or other content): the message starts with the field. Not ALREADY_EXISTS,
    # which clients commonly take for "already done" on a create: that would lose the
    # feedback silently (graphstore/errors.py says more).
    (IdempotencyConflictError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    # UNAVAILABLE is the RecordResponse contract: not written ("not written: …") or, when
    # the commit was in flight as the connection dropped, "outcome unknown: …" (retry with
    # the same idempotency_key). See README "Faults".
    (CommitOutcomeUnknownError, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for a domain exception (INTERNAL when it is not in the table)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
