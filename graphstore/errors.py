"""Domain errors raised by graph stores (mapped to gRPC status codes in ``server/``)."""


class GraphStoreError(Exception):
    """Base class of every store error."""


class StoreUnavailableError(GraphStoreError):
    """The store cannot be reached or did not answer in time; nothing was written."""


class InvalidInteractionError(GraphStoreError, ValueError):
    """An interaction is malformed (e.g. an embedding of the wrong dimension)."""
