"""Domain errors raised by graph stores (mapped to gRPC status codes in ``server/``)."""


class GraphStoreError(Exception):
    """Base class of every store error."""


class StoreUnavailableError(GraphStoreError):
    """The store cannot be reached or did not answer in time; nothing was written."""


class CommitOutcomeUnknownError(StoreUnavailableError):
    """The connection dropped while a write's commit was in flight.

    The write may or may not be stored. Retrying it with the same idempotency key (or the
    same interaction id) is safe: a stored write is then reported as a duplicate, a lost one
    is written. Raised by :meth:`GraphStore.record` of the Neo4j store for every call whose
    rows were in the transaction (``neo4j.exceptions.IncompleteCommit``).
    """


class StoreTimeoutError(StoreUnavailableError):
    """A store read did not answer within its time budget (the read was abandoned)."""


class InvalidInteractionError(GraphStoreError, ValueError):
    """An interaction is malformed (e.g. an embedding of the wrong dimension)."""
